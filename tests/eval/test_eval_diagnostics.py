import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_dino.eval import CollapseMonitor, collapse_statistics


def reference_statistics(student, teacher, center, student_temp, teacher_temp):
    """Independent per-pair loop with torch.distributions and F.kl_div."""
    teacher_p = F.softmax((teacher - center) / teacher_temp, dim=-1)
    entropy = torch.distributions.Categorical(probs=teacher_p).entropy().mean()
    kls = []
    for t in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v != t:
                log_s = F.log_softmax(student[v] / student_temp, dim=-1)
                kls.append(F.kl_div(log_s, teacher_p[t], reduction="batchmean"))
    return {
        "teacher_entropy": entropy,
        "teacher_entropy_ratio": entropy / math.log(teacher.shape[-1]),
        "teacher_student_kl": torch.stack(kls).mean(),
        "center_norm": torch.linalg.vector_norm(center),
        "teacher_max_prob": teacher_p.max(dim=-1).values.mean(),
    }


@pytest.mark.parametrize(("n_crops", "teacher_temp"), [(2, 0.04), (6, 0.07), (3, 1.0)])
def test_collapse_statistics_match_reference(n_crops, teacher_temp):
    gen = torch.Generator().manual_seed(n_crops)
    student = torch.randn(n_crops, 5, 32, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)
    center = torch.randn(1, 32, generator=gen, dtype=torch.float64) * 0.1
    stats = collapse_statistics(student.half(), teacher.half(), center, 0.1, teacher_temp)
    expected = reference_statistics(
        student.half().double(), teacher.half().double(), center, 0.1, teacher_temp
    )
    assert set(stats) == set(expected)
    for name, value in stats.items():
        assert value.dtype == torch.float32 and value.ndim == 0
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-4, atol=1e-5)


def test_collapse_statistics_needs_no_grad():
    student = torch.randn(4, 2, 8, requires_grad=True)
    stats = collapse_statistics(student, torch.randn(2, 2, 8), torch.zeros(1, 8), 0.1, 0.04)
    assert not any(value.requires_grad for value in stats.values())


class FakeTrainer:
    global_step = 7


def drive(monitor, teacher_logits, steps):
    stats = collapse_statistics(
        torch.randn(4, 8, 64), teacher_logits, torch.zeros(1, 64), 0.1, 0.04
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            outputs = {"loss": torch.tensor(1.0), "diagnostics": stats}
            monitor.on_train_batch_end(FakeTrainer(), None, outputs, None, step)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("teacher_logits", "kind", "advice"),
    [
        (torch.zeros(2, 8, 64), "near-uniform", "lower the teacher temperature"),
        (
            torch.zeros(2, 8, 64).index_fill_(-1, torch.tensor([3]), 50.0),
            "near-one-hot",
            "center_momentum 0.9",
        ),
    ],
)
def test_collapse_monitor_warns_once(teacher_logits, kind, advice):
    monitor = CollapseMonitor(patience_steps=5)
    assert drive(monitor, teacher_logits, steps=4) == []
    messages = drive(monitor, teacher_logits, steps=20)
    assert len(messages) == 1
    assert kind in messages[0] and advice in messages[0]


def test_collapse_monitor_streak_resets_and_healthy_is_silent():
    monitor = CollapseMonitor(patience_steps=3)
    healthy = {"diagnostics": {"teacher_entropy_ratio": torch.tensor(0.5)}}
    uniform = {"diagnostics": {"teacher_entropy_ratio": torch.tensor(0.99)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for outputs in [uniform, uniform, healthy] * 5 + [healthy] * 10:
            monitor.on_train_batch_end(FakeTrainer(), None, outputs, None, 0)
    assert caught == []


def test_collapse_monitor_ignores_missing_diagnostics():
    monitor = CollapseMonitor(patience_steps=1)
    monitor.on_train_batch_end(FakeTrainer(), None, {"loss": torch.tensor(1.0)}, None, 0)
    monitor.on_train_batch_end(FakeTrainer(), None, None, None, 1)
    assert monitor.warned == set()


def test_collapse_monitor_validates_thresholds():
    with pytest.raises(ValueError, match="one_hot_ratio < uniform_ratio"):
        CollapseMonitor(uniform_ratio=0.1, one_hot_ratio=0.5)
