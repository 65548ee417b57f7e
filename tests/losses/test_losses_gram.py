"""Gram anchoring (DINOv3): the loss against a per-image float64 loop, and the Gram teacher as a
snapshot of the EMA teacher taken at the start step and refreshed every N steps."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.losses.gram import GramLoss
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
