"""Activation checkpointing: the blocks really recompute in backward, and the gradients equal the
plain backbone's (stochastic depth, DINOv3's RoPE rescaling and iBOT's masks included)."""

import copy

import pytest
import timm
import torch
from torch import nn

from lightning_dino import DINO, Distillation
from lightning_dino.networks.checkpointing import use_activation_checkpointing
from tests.conftest import TINY_VIT
from tests.test_dinov3_backbones import EVA


def forward_counts(module: nn.Module) -> list[int]:
    """A list that counts the calls of ``module`` (one entry; a pre-hook, as a recomputation stops
    once it has what backward needs)."""
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def gradients(backbone: nn.Module, images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    backbone.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    backbone.train()(images).square().sum().backward()
    return {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("name", "kwargs", "stage"),
    [
        ("vit_tiny_patch16_224", {**TINY_VIT["backbone_kwargs"], "drop_path_rate": 0.3}, "blocks.0"),
        ("vit_small_patch16_dinov3", {**EVA["backbone_kwargs"], "drop_path_rate": 0.3}, "blocks.0"),
        ("test_resnet", {}, "layer1.0"),
    ],
)
def test_blocks_recompute_in_backward_with_the_plain_gradients(name, kwargs, stage):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=0, **kwargs)
    checkpointed = use_activation_checkpointing(copy.deepcopy(plain))
    images = torch.randn(4, 3, 32, 32)
    counts = forward_counts(checkpointed.get_submodule(stage))
    expected = gradients(plain, images, seed=1)
    got = gradients(checkpointed, images, seed=1)
    assert counts[0] == 2  # the forward, then its recomputation in backward
    assert expected.keys() == got.keys() and len(got) > 4
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dino_checkpoints_the_student_only_and_its_step_gradients_are_unchanged():
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DINO(**{**EVA, "drop_path_rate": 0.2}, rope_rescale_coords=2.0, ibot_loss_weight=1.0,
                     activation_checkpointing=checkpointing)
        assert model.student.backbone.grad_checkpointing is checkpointing
        assert model.teacher.backbone.grad_checkpointing is False
        torch.manual_seed(1)
        model.compute_step(crops, {}).loss.backward()
        grads.append({n: p.grad for n, p in model.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6, msg=key)


def test_distillation_checkpoints_the_student_not_the_teacher():
    model = Distillation(teacher="vit_tiny_patch16_224", teacher_kwargs=TINY_VIT["backbone_kwargs"],
                         backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT["backbone_kwargs"],
                         activation_checkpointing=True)
    assert model.student.backbone.grad_checkpointing and not model.teacher.backbone.grad_checkpointing


def test_a_backbone_without_the_switch_is_named_with_the_fix():
    class Plain(nn.Module):
        num_features = 8

        def forward(self, x):
            return x.mean((2, 3)).repeat(1, 3)[:, :8]

    with pytest.raises(ValueError, match=r"DINO\(activation_checkpointing=True\) needs a backbone with timm's"):
        DINO(backbone=Plain(), out_dim=16, hidden_dim=8, bottleneck_dim=4, activation_checkpointing=True)
