"""The feature-distillation loss against a per-sample float64 loop, its resizing and precision."""

import math

import pytest
import torch

from lightning_dino.losses.distillation import (
    FeatureDistillationLoss,
    normalised_distance,
    resize_map,
)


def reference_loss(student, teacher, student_map, teacher_map, distance, spatial_weight):
    """The loss written out sample by sample, vector by vector, in float64 Python arithmetic."""

    def d(a, b):
        a, b = a.double(), b.double()
        cos = float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))
        return 1 - cos if distance == "cosine" else 2 - 2 * cos

    batch = len(student)
    pooled = sum(d(student[i], teacher[i]) for i in range(batch)) / batch
    _, _, h, w = student_map.shape
    _, _, big_h, big_w = teacher_map.shape
    fy, fx = big_h // h, big_w // w  # integer factor: the area average is a block mean
    spatial = 0.0
    for i in range(batch):
        for y in range(h):
            for x in range(w):
                block = teacher_map[i, :, y * fy:(y + 1) * fy, x * fx:(x + 1) * fx].double()
                spatial += d(student_map[i, :, y, x], block.mean(dim=(1, 2)))
    spatial /= batch * h * w
    return pooled + spatial_weight * spatial, pooled, spatial


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_loss_matches_a_per_sample_float64_loop(distance):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    student_map, teacher_map = torch.randn(5, 7, 2, 3, generator=gen), torch.randn(5, 7, 4, 6, generator=gen)
    loss, terms = FeatureDistillationLoss(distance, spatial_weight=0.5)(student, teacher, student_map, teacher_map)
    want, pooled, spatial = reference_loss(student, teacher, student_map, teacher_map, distance, 0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert terms["global"].item() == pytest.approx(pooled, rel=1e-5)
    assert terms["spatial"].item() == pytest.approx(spatial, rel=1e-5)


def test_mse_of_normalised_vectors_is_twice_the_cosine_distance_and_zero_for_equal_directions():
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    torch.testing.assert_close(normalised_distance(a, b, "mse"), 2 * normalised_distance(a, b, "cosine"))
    torch.testing.assert_close(((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1),
                               normalised_distance(a, b, "mse"))
    assert normalised_distance(a, 3 * a, "cosine").abs().max() < 1e-6


def test_a_coarser_teacher_map_is_upsampled_bilinearly_and_no_map_means_pooled_only():
    student, teacher = torch.randn(2, 4), torch.randn(2, 4)
    student_map, teacher_map = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    loss_fn = FeatureDistillationLoss()
    _, terms = loss_fn(student, teacher, student_map, teacher_map)
    target = torch.nn.functional.interpolate(teacher_map, size=(4, 4), mode="bilinear", align_corners=False)
    want = normalised_distance(student_map.flatten(2).transpose(1, 2), target.flatten(2).transpose(1, 2), "cosine")
    torch.testing.assert_close(terms["spatial"], want.mean())
    assert resize_map(teacher_map, (2, 2)) is teacher_map  # one grid already: untouched
    loss, terms = loss_fn(student, teacher)
    assert set(terms) == {"global"} and torch.equal(loss, terms["global"])


def test_gradients_reach_the_student_only_and_the_loss_is_fp32_under_autocast():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = FeatureDistillationLoss("mse")(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance"):
        FeatureDistillationLoss("l1")
