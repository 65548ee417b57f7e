"""Distillation's objectives are objects chosen by name: each checks the teacher it needs, builds
the student and loss, and computes the step (checked here against the loss computed directly),
DINOv3's iBOT and KoLeo targets included."""

import copy

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO, Distillation
from lightning_dino.distillation_objectives import OBJECTIVES, DINOObjective, FeatureObjective
from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.losses.distillation import FeatureDistillationLoss
from lightning_dino.setting_names import cli_flags
from tests.conftest import TINY_VIT, CropData, make_trainer
from tests.losses.test_losses_dinov2 import koleo_brute_force
from tests.networks.test_networks_tokens import reference_tokens

STUDENT = {"backbone": "test_resnet", "warmup_epochs": 0, "monitors": True}


def teacher():
    return timm.create_model("test_resnet", num_classes=0)


def test_the_objectives_by_name():
    assert OBJECTIVES == {"features": FeatureObjective, "dino": DINOObjective}


def test_an_unknown_objective_names_the_choices_and_the_class():
    with pytest.raises(ValueError, match=r"Distillation\(objective='dinov2'\): use 'features' or 'dino'"):
        Distillation(teacher(), objective="dinov2", **STUDENT)
    with cli_flags(), pytest.raises(ValueError, match=r"--model\.objective=dinov2: use"):
        Distillation(teacher(), objective="dinov2", **STUDENT)


def test_the_dino_objective_refuses_a_teacher_without_a_head_naming_the_class():
    with pytest.raises(ValueError, match=r"Distillation\(objective='dino'\) needs a teacher with a DINO head"):
        Distillation(teacher(), objective="dino", **STUDENT)


def test_the_features_step_is_the_feature_loss_of_the_global_crops():
    model = Distillation(teacher(), **STUDENT).eval()
    assert isinstance(model.objective, FeatureObjective)
    assert CollapseMonitor not in model.monitor_types()  # no prototypes, no collapse warning
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        result = model.compute_step(crops, {})
        images = torch.cat(crops)
        teacher_pooled, teacher_map = model.teacher.features(images, None)
        pooled, fmap = model.student(images)
        want, parts = FeatureDistillationLoss("cosine", spatial_weight=1.0)(pooled, teacher_pooled, fmap, teacher_map)
    torch.testing.assert_close(result.loss, want)
    assert result.losses.keys() == {f"train/{name}_loss" for name in parts}
    assert result.prototypes is None and result.batch_size == 2


@pytest.fixture(scope="module")
def ibot_teacher(tmp_path_factory):
    """A tiny-ViT DINO run with iBOT (its own head) after 2 steps: a teacher with patch targets."""
    torch.manual_seed(0)
    dino = DINO(**TINY_VIT, ibot_loss_weight=1.0, ibot_separate_head=True, ibot_out_dim=48, warmup_epochs=0,
                freeze_last_layer=0, drop_path_rate=0.0, monitors=False)
    trainer = make_trainer(max_steps=2)
    trainer.fit(dino, datamodule=CropData())
    path = tmp_path_factory.mktemp("ibot_teacher") / "dino.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_dinov3_distillation_adds_ibot_targets_at_unmasked_student_positions_and_koleo(ibot_teacher):
    """dinov3/train/ssl_meta_arch.py with distillation: the teacher's iBOT head on its patch tokens at
    the mask positions, the student's own iBOT head at the same positions of the whole crops (its
    input is not masked), KoLeo on the student's global-crop features."""
    torch.manual_seed(1)
    model = Distillation(str(ibot_teacher), objective="dino", backbone=TINY_VIT["backbone"],
                         backbone_kwargs=TINY_VIT["backbone_kwargs"], ibot_loss_weight=1.0, koleo_loss_weight=0.1,
                         warmup_epochs=0, monitors=False)
    assert model.student.patch_head.last_layer.weight.shape == model.teacher.patch_head.last_layer.weight.shape
    start = copy.deepcopy(model)
    saved = torch.load(ibot_teacher, weights_only=True)["state_dict"]
    assert torch.equal(model.ibot.loss.center, saved["ibot.loss.center"])  # the teacher run's centre
    captured = {}
    draw = model.ibot.draw_masks
    model.ibot.draw_masks = lambda *args: captured.setdefault("masks", draw(*args))

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            captured["globals"] = torch.cat([c.clone() for c in batch[0][:2]])

    trainer = make_trainer(max_steps=1, callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(model, datamodule=CropData())
    masks, images, temp = captured["masks"], captured["globals"], model.objective.teacher_temp
    with torch.no_grad():
        teacher_tokens = reference_tokens(start.teacher.backbone, images)[:, 1:]
        student_tokens = reference_tokens(start.student.backbone, images)[:, 1:]  # not masked
        t = torch.softmax((start.teacher.patch_head(teacher_tokens[masks]).double()
                           - saved["ibot.loss.center"].double()) / temp, -1)
        s = torch.log_softmax(start.student.patch_head(student_tokens[masks]).double() / 0.1, -1)
        features = start.student.backbone(images).reshape(2, 4, -1)
    total, row = 0.0, 0
    for image_mask in masks:
        n = int(image_mask.sum())
        if n:
            total += float(-(t[row:row + n] * s[row:row + n]).sum(-1).mean())
        row += n
    metrics = trainer.callback_metrics
    assert float(metrics["train/ibot_loss"]) == pytest.approx(total / len(masks), rel=1e-4)
    want_koleo = sum(koleo_brute_force(crop) for crop in features)
    assert float(metrics["train/koleo_loss"]) == pytest.approx(want_koleo, rel=1e-4)
    loss = metrics["train/dino_loss"] + metrics["train/ibot_loss"] + 0.1 * metrics["train/koleo_loss"]
    assert float(metrics["train/loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_the_extra_terms_are_checked_against_the_teacher_and_the_objective(ibot_teacher, tmp_path):
    with pytest.raises(ValueError, match=r"Distillation\(ibot_loss_weight=1.0\) applies to Distillation\(objective='dino'\)"):
        Distillation(teacher(), ibot_loss_weight=1.0, **STUDENT)
    plain = DINO(**TINY_VIT, monitors=False)
    trainer = make_trainer(max_steps=1)
    trainer.fit(plain, datamodule=CropData())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"Distillation\(ibot_loss_weight=1.0\) needs a teacher that trained with iBOT"):
        Distillation(str(tmp_path / "plain.ckpt"), objective="dino", ibot_loss_weight=1.0, **STUDENT)
    with pytest.raises(ValueError, match=r"Distillation\(ibot_loss_weight=\.\.\.\) needs patch tokens: ResNet"):
        Distillation(str(ibot_teacher), objective="dino", ibot_loss_weight=1.0, **STUDENT)
    other_patches = {**TINY_VIT["backbone_kwargs"], "patch_size": 16}
    with pytest.raises(ValueError, match=r"needs the student's patch grid to be the teacher's: patches of \(16, 16\)"):
        Distillation(str(ibot_teacher), objective="dino", ibot_loss_weight=1.0, backbone=TINY_VIT["backbone"],
                     backbone_kwargs=other_patches)
    # Without iBOT the teacher keeps no iBOT head (checkpoint keys as before).
    assert not hasattr(Distillation(str(ibot_teacher), objective="dino", **STUDENT).teacher, "patch_head")
