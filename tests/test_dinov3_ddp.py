"""DINOv3's switches all on, one Lightning DDP step on two gloo ranks of the DINOv3 architecture:
KoLeo seeks neighbours in both ranks' images (checked against a brute force on the gathered
batch), the exact mask counts hold on each rank, the square-root learning-rate rule uses the
global batch, and both ranks end the step with the same networks (per-submodule clipping,
AdamW's betas and the rescaled rotary coordinates included)."""

import math
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_dino.losses.ibot as ibot_module
import lightning_dino.losses.koleo as koleo_module
from lightning_dino import DINO
from tests.conftest import CropData, make_trainer, run_on_gloo
from tests.test_dinov3_backbones import EVA
from tests.test_dinov3_switches import official_mask_counts

SWITCHES = {"head_weight_norm": False, "ibot_loss_weight": 1.0, "ibot_separate_head": True, "ibot_mask_rule": "dinov3",
            "ibot_mask_probability": 0.5, "koleo_loss_weight": 0.1, "koleo_group_size": 8, "clip_mode": "per_module",
            "adamw_betas": (0.9, 0.99), "lr_scaling": "sqrt_wrt_1024", "local_loss_weight": 0.5,
            "rope_rescale_coords": 2.0, "monitors": False}


# LayerScale at 1 rather than DINOv3's 1e-5: at 1e-5 the fresh network's class tokens are equal to
# within float32 rounding, and nearest neighbours among them are noise.
BACKBONE = {**EVA, "backbone_kwargs": {**EVA["backbone_kwargs"], "init_values": 1.0}}


def initial_model():
    torch.manual_seed(0)
    return DINO(**BACKBONE, **SWITCHES)


def _one_ddp_step(rank):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29501")
    model = initial_model()
    seen = {"koleo_inputs": []}
    real_masks, real_koleo = ibot_module.batch_masks, koleo_module.koleo_over_ranks

    def recording_masks(*args, **kwargs):
        seen["masks"] = real_masks(*args, **kwargs)
        return seen["masks"]

    def recording_koleo(x, group_size):
        seen["koleo_inputs"].append(x.detach().clone())
        return real_koleo(x, group_size)

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["globals"] = torch.cat([crop.clone() for crop in batch[0][:2]])

    ibot_module.batch_masks, koleo_module.koleo_over_ranks = recording_masks, recording_koleo
    try:
        trainer = make_trainer(max_steps=1, devices=2, strategy="ddp", callbacks=[Record()], log_every_n_steps=1)
        trainer.fit(model, CropData(batch_size=4, n=8))
    finally:
        ibot_module.batch_masks, koleo_module.koleo_over_ranks = real_masks, real_koleo
    return {"masks": seen["masks"], "globals": seen["globals"], "koleo": trainer.callback_metrics["train/koleo_loss"],
            "koleo_inputs": seen["koleo_inputs"],
            "peak_lr": model.peak_lr, "student": {k: v.clone() for k, v in model.student.state_dict().items()},
            "teacher": {k: v.clone() for k, v in model.teacher.state_dict().items()}}


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_dinov3_switches_under_ddp(tmp_path):
    ranks = run_on_gloo(_one_ddp_step, tmp_path)
    for r in ranks:
        assert sorted(r["masks"].sum(1).tolist()) == official_mask_counts(8, 16, (0.1, 0.5), 0.5)
        assert r["peak_lr"] == 0.0005 * 4 * math.sqrt(8 / 1024)  # the global batch of both ranks
    assert not torch.equal(ranks[0]["globals"], ranks[1]["globals"])
    # KoLeo over the group of both ranks: per global crop, each rank's 4 features (what the term
    # received) against the 8 of both ranks, by brute force; the logged value is the ranks' mean.
    per_rank = [sum(koleo_own_rows(torch.cat([ranks[0]["koleo_inputs"][crop], ranks[1]["koleo_inputs"][crop]]), rank)
                    for crop in range(2)) for rank in range(2)]
    assert float(ranks[0]["koleo"]) == pytest.approx(sum(per_rank) / 2, rel=1e-4)
    own_only = sum(koleo_own_rows(torch.cat([ranks[0]["koleo_inputs"][crop]] * 2), 0) for crop in range(2))
    assert abs(own_only - per_rank[0]) > 1e-3  # neighbours on the other rank were used
    for key in ("student", "teacher"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name}"


def koleo_own_rows(rows, rank):
    """KoLeo of rank ``rank``'s 4 rows among all 8 (brute force, float64)."""
    everyone = torch.nn.functional.normalize(rows.double(), dim=-1)
    total = 0.0
    for i in range(4 * rank, 4 * rank + 4):
        total += math.log(min(float((everyone[i] - everyone[j]).norm()) for j in range(8) if j != i) + 1e-8)
    return -total / 4
