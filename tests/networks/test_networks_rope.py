"""DINOv3's rescaled rotary coordinates: a log-uniform factor per block of the student in training,
against an independent computation of dinov3/layers/rope_position_encoding.py; none in evaluation,
none for the teacher."""

import math

import pytest
import torch

from lightning_dino import DINO
from tests.conftest import TINY_VIT
from tests.test_dinov3_backbones import EVA


def official_rope(shape, head_dim, factor_log):
    """dinov3/layers/rope_position_encoding.py: centred coordinates in [-1, 1] per axis, times exp(u),
    angles 2 pi c / 100^(2i / (D/2)), [h | w] frequencies, sin and cos tiled twice (half layout)."""
    h, w = shape
    ys, xs = (torch.arange(h, dtype=torch.float64) + 0.5) / h, (torch.arange(w, dtype=torch.float64) + 0.5) / w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2) * 2 - 1
    coords = coords * math.exp(factor_log)
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)
    return torch.cat([angles.sin().tile(2), angles.cos().tile(2)], -1)


def test_rotary_coordinates_are_rescaled_per_block_in_training_only():
    model = DINO(**EVA, rope_rescale_coords=2.0)
    student, teacher = model.student.backbone, model.teacher.backbone
    seen = []
    for block in student.blocks:
        block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["rope"].double()), with_kwargs=True)
    images = torch.randn(2, 3, 32, 24)
    torch.manual_seed(3)
    student.train()(images)
    torch.manual_seed(3)
    draws = [float(torch.empty(1).uniform_(-math.log(2), math.log(2))) for _ in range(3)]  # _pos_embed, 2 blocks
    for block_rope, u in zip(seen, draws[1:], strict=True):
        torch.testing.assert_close(block_rope, official_rope((4, 3), 16, u), rtol=1e-5, atol=1e-5)
    assert not torch.equal(seen[0], seen[1])
    seen.clear()
    student.eval()(images)
    torch.testing.assert_close(seen[0], official_rope((4, 3), 16, 0.0), rtol=1e-5, atol=1e-5)
    assert teacher.rope.rescale_coords is None  # the teacher sees plain coordinates
    with pytest.raises(ValueError, match=r"DINO\(rope_rescale_coords=2.0\) needs a backbone with DINOv3's rotary"):
        DINO(**TINY_VIT, rope_rescale_coords=2.0)
