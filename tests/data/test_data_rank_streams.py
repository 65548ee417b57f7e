"""Every rank draws its own random numbers: two gloo ranks training on a folder of 16 copies of
one picture get different crops (boxes, flips, jitter, blur...) and different iBOT masks on every
augmentation path, with and without loader workers, whether ``seed_everything`` seeded the
workers or not. Before ranks got their own streams, 8 of 8 crops were equal on every path."""

import functools
import itertools
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from lightning_dino import DINO, MultiCropDataModule
from lightning_dino.seeding import rank_seed
from tests.conftest import TINY_VIT, make_trainer, run_on_gloo

PATHS = ["per_sample", "batched", "device"]
# (path, workers, seed_everything(workers=...)); without workers the flag changes nothing.
CASES = [(path, 0, False) for path in PATHS] + list(itertools.product(PATHS, [1], [False, True]))


def _first_batches(rank, folder):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    seen = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["crops"] = [crop.clone() for crop in batch[0]]

    results = {}
    for path, workers, seed_workers in CASES:
        pl.seed_everything(0, workers=seed_workers, verbose=False)
        model = DINO(**TINY_VIT, ibot_loss_weight=1.0, monitors=False, warmup_epochs=0)
        draw = model.ibot.draw_masks

        def record_masks(*args, draw=draw):
            seen["masks"] = draw(*args)
            return seen["masks"]

        model.ibot.draw_masks = record_masks
        data = MultiCropDataModule(dataset="folder", data_dir=str(folder), batch_size=2, num_workers=workers,
                                   augmentation=path, global_crop_size=32, local_crop_size=16, n_local_crops=2)
        make_trainer(max_steps=1, devices=2, strategy="ddp", callbacks=[Record()]).fit(model, data)
        results[(path, workers, seed_workers)] = {"crops": seen["crops"], "masks": seen["masks"]}
    return results


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_draw_different_crops_and_masks_on_every_path(tmp_path):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    folder = tmp_path / "one_picture" / "class"
    folder.mkdir(parents=True)
    for i in range(16):
        picture.save(folder / f"{i}.png")
    ranks = run_on_gloo(functools.partial(_first_batches, folder=folder.parent), tmp_path)
    for case in CASES:
        crops = [r[case]["crops"] for r in ranks]
        assert len(crops[0]) == 4 and crops[0][0].shape[0] == 2, case  # 2 global + 2 local, batch 2
        equal = [torch.equal(a[i], b[i]) for a, b in zip(*crops, strict=True) for i in range(2)]
        assert not any(equal), (case, f"{sum(equal)} of {len(equal)} crops equal across ranks")
        masks = [r[case]["masks"] for r in ranks]
        assert masks[0].any() and not torch.equal(masks[0], masks[1]), case


def test_rank_seeds():
    assert rank_seed(7, 0) == 7  # a one-process run draws what it always drew
    seeds = {rank_seed(7, rank) for rank in range(1, 64)} | {rank_seed(8, 1)}
    assert len(seeds) == 64 and 7 not in seeds and all(0 <= s < 2**32 for s in seeds)
    assert rank_seed(7, 3) == rank_seed(7, 3)
