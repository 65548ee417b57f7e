"""DINOv2/DINOv3 details that follow the official recipes: the teacher temperature warmed up per
step, a separate iBOT head, Gram anchoring's negatives, refresh cap and teacher resolution, and
the ViT-S/14 recipe's trainable last-layer norm."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.losses.gram import GramTerm
from tests.conftest import TINY_VIT, CropData, make_trainer
from tests.networks.test_networks_tokens import reference_tokens

CONFIGS = Path(__file__).parents[1] / "configs"


class RecordTemperature(Callback):
    def __init__(self):
        self.temps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.temps.append(trainer.callback_metrics["train/teacher_temp"].item())


def test_teacher_temperature_warms_up_per_step_as_dinov2():
    # 4 steps per epoch, warmup over 1.5 epochs = 6 steps; DINOv2: linspace(start, end, warmup_iters).
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=0, warmup_teacher_temp=0.02, teacher_temp=0.05,
                 warmup_teacher_temp_epochs=1.5, teacher_temp_per_step=True)
    record = RecordTemperature()
    make_trainer(max_epochs=2, callbacks=[record], log_every_n_steps=1).fit(model, CropData(batch_size=4, n=16))
    expected = [*np.linspace(0.02, 0.05, 6), 0.05, 0.05]
    assert record.temps == pytest.approx(expected, rel=1e-6)
    per_epoch = DINO(**TINY_VIT, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=2)
    assert [per_epoch.teacher_temp(0, step) for step in range(4)] == [0.02] * 4  # DINO: constant in an epoch


def test_a_separate_ibot_head_projects_the_patches():
    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, freeze_last_layer=0, ibot_loss_weight=1.0,
                 ibot_separate_head=True, ibot_out_dim=48, ibot_bottleneck_dim=8)
    assert model.student.patch_head.last_layer.parametrizations.weight.original1.shape == (48, 8)
    assert model.teacher.patch_head is not model.student.patch_head
    assert model.ibot.loss.center.shape == (1, 48) and model.loss.center.shape == (1, 64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    forward = model.ibot.forward

    def spy(outputs, temp):
        seen.setdefault("outputs", outputs)
        return forward(outputs, temp)

    model.ibot.forward = spy
    make_trainer(max_steps=2).fit(model, CropData(batch_size=4, n=8))
    outputs = seen["outputs"]
    # The step's patch logits are the separate heads' on the masked patch tokens.
    fresh = DINO(**TINY_VIT, drop_path_rate=0.0, ibot_loss_weight=1.0, ibot_separate_head=True,
                 ibot_out_dim=48, ibot_bottleneck_dim=8)
    fresh.load_state_dict(start)
    with torch.no_grad():
        tokens = reference_tokens(fresh.teacher.backbone, torch.cat(outputs.crops[:2]))[:, 1:]
        torch.testing.assert_close(outputs.teacher_patch_logits, fresh.teacher.patch_head(tokens[outputs.masks]))
    assert outputs.student_patch_logits.shape == (int(outputs.masks.sum()), 48)
    moved = [k for k in start if k.startswith(("student.patch_head", "teacher.patch_head"))
             and not torch.equal(start[k], model.state_dict()[k])]
    assert any(k.startswith("student.") for k in moved) and any(k.startswith("teacher.") for k in moved)


def test_gram_anchors_negative_similarities_by_default_as_dinov3_configs():
    model = DINO(**TINY_VIT, gram_loss_weight=1.0)
    assert model.gram.loss.remove_negatives is False
    assert DINO(**TINY_VIT, gram_loss_weight=1.0, gram_remove_negatives=True).gram.loss.remove_negatives


def test_gram_teacher_refreshes_are_capped():
    term = GramTerm(1.0, DINO(**TINY_VIT).teacher.backbone, start_step=2, update_every=3, max_updates=2)
    assert [s for s in range(20) if term.snapshot_due(s)] == [2, 5, 8]
    term.max_updates = 0
    assert [s for s in range(12) if term.snapshot_due(s)] == [2, 5, 8, 11]


def test_gram_teacher_at_a_higher_resolution_is_resized_to_the_student_grid():
    teacher = DINO(**TINY_VIT).teacher.backbone
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    tokens = torch.randn(4, 16, 32)

    class Outputs:
        pass

    outputs = Outputs()
    outputs.crops, outputs.n_global, outputs.patch_tokens, outputs.extra_crops = crops, 2, tokens, {}
    same = GramTerm(1.0, teacher)(outputs, 0.04)
    assert GramTerm(1.0, teacher, image_size=32)(outputs, 0.04).item() == pytest.approx(same.item(), rel=1e-6)
    larger = GramTerm(1.0, teacher, image_size=64)
    value = larger(outputs, 0.04)
    assert torch.isfinite(value) and abs(value.item() - same.item()) > 1e-6


def test_the_vits14_recipe_trains_the_last_layer_norm_and_warms_the_temperature_per_step():
    model = yaml.safe_load((CONFIGS / "dinov2_vits14.yaml").read_text())["model"]
    assert model["norm_last_layer"] is False and model["teacher_temp_per_step"] is True
