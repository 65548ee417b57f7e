"""Gram anchoring (DINOv3): the loss against a per-image float64 loop and DINOv3's formula (batch
level, teacher-only negatives), its weight schedule, the features' resizing, and the Gram teacher:
a checkpoint's or a snapshot of the EMA teacher, refreshed every N steps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.losses.gram import GramLoss, GramTerm, resize_patch_grid
from tests.conftest import TINY_VIT, CropData, make_trainer


def gram_loop(student, teacher, mode):
    total = 0.0
    for s, t in zip(student.double(), teacher.double(), strict=True):
        s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        ss, tt = s @ s.T, t @ t.T
        if mode == "both":
            ss, tt = ss.clamp(min=0), tt.clamp(min=0)
        total += float(((ss - tt) ** 2).mean())
    return total / len(student)


@pytest.mark.parametrize("mode", ["both", "none"])
def test_gram_loss_equals_a_per_image_loop(mode):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 10, 8, generator=gen), torch.randn(3, 10, 12, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = GramLoss(mode == "both")(student, teacher)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(gram_loop(student, teacher, mode), rel=1e-5)
    with pytest.raises(ValueError, match="same B and N"):
        GramLoss()(student, teacher[:, :5])


def test_the_gram_teacher_is_a_snapshot_of_the_ema_teacher_and_the_term_starts_on_time():
    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, gram_loss_weight=1.0, gram_start_step=2,
                 gram_update_every=3)
    teachers, logged = {}, {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # The teacher as step `global_step` starts (callbacks run before the module's hook).
            state = pl_module.teacher.backbone.state_dict()
            teachers[trainer.global_step] = {k: v.clone() for k, v in state.items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged[trainer.global_step] = trainer.callback_metrics.get("train/gram_loss")

    make_trainer(max_steps=6, callbacks=[Record()], log_every_n_steps=1).fit(model, CropData(batch_size=4, n=24))
    # The term is on from step 2 (the 3rd batch), logged after it.
    assert logged[1] is None and logged[2] is None and logged[3] is not None and float(logged[3]) > 0
    # Taken as step 2 starts, refreshed as step 5 starts (2 + 3), not at any other step.
    for name, value in model.gram.teacher.state_dict().items():
        assert torch.equal(value, teachers[5][name]), name
    moved = [n for n, v in model.gram.teacher.state_dict().items() if not torch.equal(v, teachers[4][n])]
    assert moved  # the teacher of step 4 differs: the snapshot is the refreshed one
    assert all(not p.requires_grad for p in model.gram.teacher.parameters())


def test_gram_loss_is_zero_when_student_and_gram_teacher_are_the_same_network():
    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, gram_loss_weight=1.0)
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/gram_loss"]))

    make_trainer(max_steps=2, callbacks=[Record()], log_every_n_steps=1).fit(model, CropData(batch_size=4, n=8))
    # Step 0: the Gram teacher is the teacher, which starts as a copy of the student.
    assert seen[0] < 1e-10 and seen[1] > seen[0]
    with pytest.raises(ValueError, match=r"DINO\(gram_loss_weight=...\) needs patch tokens: ResNet is not a timm ViT"):
        DINO(backbone="test_resnet", out_dim=16, hidden_dim=8, bottleneck_dim=4, gram_loss_weight=1.0)


def official_gram(student, teacher, image_level=True, remove_neg=False, remove_only_teacher_neg=False):
    """dinov3/loss/gram_loss.py, by loops in float64: normalise, Gram per image (or over all the
    batch's patches), clamp, MSE averaged over the entries."""
    s, t = student.double(), teacher.double()
    s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    if not image_level:
        s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
    total, count = 0.0, 0
    for si, ti in zip(s, t, strict=True):
        ss, tt = si @ si.T, ti @ ti.T
        if remove_neg:
            ss, tt = ss.clamp(min=0), tt.clamp(min=0)
        if remove_only_teacher_neg:
            tt = tt.clamp(min=0)
        total += float(((ss - tt) ** 2).sum())
        count += ss.numel()
    return total / count


@pytest.mark.parametrize(("image_level", "teacher_only"), [(False, False), (True, True), (False, True)])
def test_batch_level_and_teacher_only_negatives_equal_the_official_formula(image_level, teacher_only):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 10, 8, generator=gen), torch.randn(3, 10, 12, generator=gen)
    got = GramLoss(remove_teacher_negatives=teacher_only, image_level=image_level)(student, teacher)
    want = official_gram(student, teacher, image_level, remove_only_teacher_neg=teacher_only)
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="exclude each other"):
        GramLoss(remove_negatives=True, remove_teacher_negatives=True)


def test_the_weight_follows_dinov3s_gram_phase_schedule():
    """dinov3/train/cosine_lr_scheduler.py linear_warmup_cosine_decay(start 0, peak 0, end w,
    warmup = start step, cosine over the ramp): 0, then w (1 - cos(pi j / (n - 1))) / 2, then w."""
    backbone = DINO(**TINY_VIT).teacher.backbone
    term = GramTerm(2.0, backbone, start_step=100, ramp_steps=10)
    warmup = np.zeros(100)
    ramp = 2.0 + 0.5 * (0.0 - 2.0) * (1 + np.cos(np.pi * np.arange(10) / 9))
    want = np.concatenate([warmup, ramp, np.full(20, 2.0)])
    got = np.array([term.weight_at(step) for step in range(130)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert GramTerm(1.5, backbone).weight_at(0) == 1.5  # the high-resolution phase: constant


def test_patch_features_are_resized_bicubic_without_antialias():
    """dinov3/train/ssl_meta_arch.py: (B, N, D) -> (B, D, n, n) -> interpolate(bicubic,
    align_corners=False, antialias=False) -> (B, N', D)."""
    vit = DINO(**TINY_VIT).teacher.backbone
    tokens = torch.randn(2, 64, 32)
    got = resize_patch_grid(tokens, (64, 64), vit, (4, 4))
    grid = tokens.transpose(-2, -1).unflatten(-1, (8, 8))
    want = F.interpolate(grid, (4, 4), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(got, want.flatten(-2).transpose(-2, -1))


def test_the_first_gram_teacher_comes_from_a_checkpoint_or_the_ema_teacher_at_a_given_step(tmp_path):
    source = DINO(**TINY_VIT, monitors=False)
    trainer = make_trainer(max_steps=2)
    trainer.fit(source, CropData(batch_size=4, n=8))
    trainer.save_checkpoint(tmp_path / "gram.ckpt")
    model = DINO(**TINY_VIT, gram_loss_weight=1.0, gram_teacher_checkpoint=str(tmp_path / "gram.ckpt"))
    model.gram.start_run()  # what a run from step 0 does
    for name, value in source.teacher.backbone.state_dict().items():
        assert torch.equal(model.gram.teacher.state_dict()[name], value), name
    assert not model.gram.snapshot_due(0)  # the checkpoint is the first Gram teacher
    later = GramTerm(1.0, source.teacher.backbone, start_step=10, teacher_step=4, update_every=5, max_updates=2)
    assert [step for step in range(40) if later.snapshot_due(step)] == [4, 15, 20]
    with pytest.raises(FileNotFoundError, match=r"gram_teacher_checkpoint='nowhere.ckpt'\): no such file"):
        DINO(**TINY_VIT, gram_loss_weight=1.0, gram_teacher_checkpoint="nowhere.ckpt").gram.start_run()


def test_the_gram_teacher_sees_the_data_modules_gram_crops_and_bad_combinations_are_named():
    from lightning_dino import MultiCropDataModule

    data = {"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "synthetic_size": 8, "synthetic_image_size": 32,
            "global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2, "gram_crop_size": 64}
    model = DINO(**TINY_VIT, gram_loss_weight=1.0, warmup_epochs=0, monitors=False)
    seen = []
    model.gram.teacher.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    trainer = make_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(model, MultiCropDataModule(**data))
    assert seen == [(8, 3, 64, 64)] * 2  # both global crops' Gram crops, at their own size
    assert torch.isfinite(trainer.callback_metrics["train/gram_loss"])
    with pytest.raises(ValueError, match=r"gram_crop_size=64\) gives the Gram teacher its own crops.*gram_image_size=64"):
        make_trainer(max_steps=1).fit(DINO(**TINY_VIT, gram_loss_weight=1.0, gram_image_size=64),
                                      MultiCropDataModule(**data))
    with pytest.warns(UserWarning, match=r"gram_crop_size=64\) makes crops for a Gram teacher, but this DINO has no"):
        make_trainer(max_steps=1).fit(DINO(**TINY_VIT, monitors=False), MultiCropDataModule(**data))
