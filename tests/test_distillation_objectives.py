"""Distillation's objectives are objects chosen by name: each checks the teacher it needs, builds
the student and loss, and computes the step (checked here against the loss computed directly)."""

import pytest
import timm
import torch

from lightning_dino import Distillation
from lightning_dino.distillation_objectives import OBJECTIVES, DINOObjective, FeatureObjective
from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.losses.distillation import FeatureDistillationLoss
from lightning_dino.setting_names import cli_flags

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
        result = model.compute_step(crops)
        images = torch.cat(crops)
        teacher_pooled, teacher_map = model.teacher.features(images, None)
        pooled, fmap = model.student(images)
        want, parts = FeatureDistillationLoss("cosine", spatial_weight=1.0)(pooled, teacher_pooled, fmap, teacher_map)
    torch.testing.assert_close(result.loss, want)
    assert result.losses.keys() == {f"train/{name}_loss" for name in parts}
    assert result.prototypes is None and result.batch_size == 2
