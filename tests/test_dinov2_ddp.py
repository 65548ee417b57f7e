"""DINO + iBOT + KoLeo for one Lightning DDP step on two gloo ranks, against independent
computations from the initial networks and each rank's own batch and masks: the iBOT patch centre
moves by the mean over both ranks' masked patches (all-reduced), while KoLeo is computed per rank
over that rank's images only, as in DINOv2 (the logged term is the mean of the two)."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_dino.losses.ibot as module_mod
from lightning_dino import DINO
from tests.conftest import TINY_VIT, CropData, make_trainer, run_on_gloo
from tests.losses.test_losses_dinov2 import koleo_brute_force
from tests.networks.test_networks_tokens import reference_tokens

SETTINGS = {**TINY_VIT, "drop_path_rate": 0.0, "warmup_epochs": 0, "ibot_loss_weight": 1.0,
            "koleo_loss_weight": 0.1, "monitors": False}
TEMP = 0.04  # the teacher temperature of the first step (no warmup)


def initial_model():
    torch.manual_seed(0)
    return DINO(**SETTINGS)


def _one_ddp_step(rank):
    """One optimizer step on rank ``rank`` of 2 (batch 4 per rank); what the checks need."""
    # The process group exists already: Lightning joins it as launched from outside (torchrun).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    model = initial_model()
    seen = {"koleo": []}
    model.koleo.loss.register_forward_hook(lambda _m, _i, out: seen["koleo"].append(out.detach()))
    real_masks = module_mod.batch_masks

    def recording_masks(*args, **kwargs):
        seen["masks"] = real_masks(*args, **kwargs)
        return seen["masks"]

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["globals"] = [crop.clone() for crop in batch[0][:2]]

    module_mod.batch_masks = recording_masks
    try:
        trainer = make_trainer(max_steps=1, devices=2, strategy="ddp", callbacks=[Record()])
        trainer.fit(model, CropData(batch_size=4, n=8))
    finally:
        module_mod.batch_masks = real_masks
    return {"center": model.ibot.loss.center.clone(), "masks": seen["masks"], "globals": seen["globals"],
            "koleo": torch.stack(seen["koleo"]), "logged_koleo": trainer.callback_metrics["train/koleo_loss"],
            "world_size": trainer.world_size, "step": trainer.global_step}


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_ibot_centre_is_all_reduced_and_koleo_is_per_rank(tmp_path):
    ranks = run_on_gloo(_one_ddp_step, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [1, 1]
    start = initial_model()
    teacher_patches, koleo_terms = [], []
    for r in ranks:
        images, masks = torch.cat(r["globals"]), r["masks"]
        assert images.shape[0] == 8 and masks.shape == (8, 16) and masks.any()  # 2 crops x 4 images
        with torch.no_grad():
            tokens = reference_tokens(start.teacher.backbone, images)[:, 1:]
            teacher_patches.append(start.teacher.head(tokens[masks]))
            # KoLeo on the student's class tokens of the masked global crops, per crop and per rank.
            cls = reference_tokens(start.student.backbone, images, masks, start.student.mask_token)[:, 0]
        per_crop = [koleo_brute_force(cls[:4]), koleo_brute_force(cls[4:])]
        koleo_terms.append(sum(per_crop))
        torch.testing.assert_close(r["koleo"].double(), torch.tensor(per_crop, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
    # The two ranks saw different images (the batch was sharded).
    assert not torch.equal(ranks[0]["globals"][0], ranks[1]["globals"][0])

    # iBOT centre: momentum 0.9 from 0, towards the mean over every rank's masked teacher patches.
    expected = 0.1 * torch.cat(teacher_patches).mean(dim=0, keepdim=True)
    for r in ranks:
        torch.testing.assert_close(r["center"], expected, rtol=1e-4, atol=1e-6)
    rank0_only = 0.1 * teacher_patches[0].mean(dim=0, keepdim=True)
    assert (rank0_only - expected).abs().max() > 100 * 1e-6  # a per-rank centre would fail above

    # KoLeo: the logged term is the mean of the per-rank terms, which differ from a global KoLeo.
    logged = torch.tensor(sum(koleo_terms) / 2, dtype=torch.float32)
    torch.testing.assert_close(ranks[0]["logged_koleo"], logged, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        both = torch.cat([torch.cat(r["globals"]) for r in ranks])
        both_masks = torch.cat([r["masks"] for r in ranks])
        cls = reference_tokens(start.student.backbone, both, both_masks, start.student.mask_token)[:, 0]
    crop_rows = [torch.cat([cls[0:4], cls[8:12]]), torch.cat([cls[4:8], cls[12:16]])]
    gathered = sum(koleo_brute_force(rows) for rows in crop_rows)
    assert abs(gathered - logged.item()) > 1e-2  # what an all-gathered KoLeo would give instead
