import math

import pytest
import torch

from lightning_dino import DINOLoss


def per_pair_reference(student, teacher, center, student_temp, teacher_temp):
    """Plain loop over (teacher view, student view) pairs, written from the paper's Eq. 3."""
    n_global, n_crops = teacher.shape[0], student.shape[0]
    total, terms = 0.0, 0
    for t in range(n_global):
        q = torch.softmax((teacher[t].double() - center.double()) / teacher_temp, dim=-1)
        for v in range(n_crops):
            if v == t:
                continue
            log_p = torch.log_softmax(student[v].double() / student_temp, dim=-1)
            per_sample = [-(q[b] * log_p[b]).sum() for b in range(student.shape[1])]
            total += torch.stack(per_sample).mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize(("n_global", "n_local"), [(1, 2), (1, 6), (2, 0), (2, 2), (2, 6), (2, 10), (1, 10)])
@pytest.mark.parametrize(("out_dim", "student_temp", "teacher_temp"), [(8, 0.1, 0.04), (64, 0.2, 0.07), (5, 0.5, 1.0)])
def test_loss_matches_per_pair_loop(n_global, n_local, out_dim, student_temp, teacher_temp):
    gen = torch.Generator().manual_seed(n_global * 100 + n_local * 10 + out_dim)
    batch = 3
    student = torch.randn(n_global + n_local, batch, out_dim, generator=gen) * 3
    teacher = torch.randn(n_global, batch, out_dim, generator=gen) * 3
    loss_fn = DINOLoss(out_dim, student_temp=student_temp, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, out_dim, generator=gen))
    old_center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, teacher_temp)
    expected = per_pair_reference(student, teacher, old_center, student_temp, teacher_temp)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # The centre moves after the loss, from the raw teacher logits of every global crop.
    batch_mean = teacher.reshape(-1, out_dim).mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, 0.9 * old_center + 0.1 * batch_mean)


def test_gradient_flows_to_student_only():
    student = torch.randn(4, 2, 16, requires_grad=True)
    teacher = torch.randn(2, 2, 16, requires_grad=True)
    DINOLoss(16)(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_uniform_prediction_gives_log_k():
    out_dim = 32
    loss = DINOLoss(out_dim)(torch.zeros(4, 3, out_dim), torch.zeros(2, 3, out_dim), 0.04)
    assert loss.item() == pytest.approx(math.log(out_dim), rel=1e-6)


def test_eval_mode_leaves_centre_alone():
    loss_fn = DINOLoss(8).eval()
    loss_fn(torch.randn(3, 2, 8), torch.randn(2, 2, 8), 0.04)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_deferred_centre_update_equals_one_big_batch():
    """Two micro-batches + one update == the centre update of the concatenated batch."""
    gen = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    deferred = DINOLoss(8)
    deferred.defer_center_update = True
    deferred(torch.randn(4, 4, 8), t1, 0.04)
    deferred(torch.randn(4, 6, 8), t2, 0.04)
    assert torch.count_nonzero(deferred.center) == 0  # nothing applied yet
    deferred.update_center()
    big = DINOLoss(8)
    big(torch.randn(4, 10, 8), torch.cat([t1, t2], dim=1), 0.04)
    torch.testing.assert_close(deferred.center, big.center)


def test_bf16_inputs_are_computed_in_fp32():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    full = DINOLoss(16)(student.bfloat16().float(), teacher.bfloat16().float(), 0.04)
    half = DINOLoss(16)(student.bfloat16(), teacher.bfloat16(), 0.04)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"out_dim": 1}, "out_dim"), ({"out_dim": 8, "center_momentum": 1.5}, "center_momentum"),
     ({"out_dim": 8, "student_temp": 0.0}, "student_temp")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(**kwargs)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="n_crops"):
        DINOLoss(8)(torch.randn(4, 3, 8), torch.randn(2, 2, 8), 0.04)


def test_centre_momentum_one_means_no_centring():
    loss_fn = DINOLoss(8, center_momentum=1.0)
    loss_fn(torch.randn(3, 2, 8), torch.randn(2, 2, 8) + 5, 0.04)
    assert torch.count_nonzero(loss_fn.center) == 0
