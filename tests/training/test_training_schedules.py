import math

import numpy as np
import pytest

from lightning_dino.training.schedules import cosine_schedule, teacher_temperature


def reference_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """numpy transcription of the reference's cosine_scheduler, to compare value for value."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize(("epochs", "niter", "warmup"), [(10, 7, 2), (5, 3, 0), (3, 4, 1)])
def test_cosine_matches_reference(epochs, niter, warmup):
    ref = reference_cosine_scheduler(2e-3, 1e-6, epochs, niter, warmup)
    ours = [cosine_schedule(s, epochs * niter, 2e-3, 1e-6, warmup * niter) for s in range(epochs * niter)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_cosine_key_points():
    total, warmup = 100, 10
    assert cosine_schedule(0, total, 1.0, 0.1, warmup) == 0.0
    assert cosine_schedule(warmup - 1, total, 1.0, 0.1, warmup) == pytest.approx(1.0)
    assert cosine_schedule(warmup, total, 1.0, 0.1, warmup) == pytest.approx(1.0)
    expected_last = 0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90))
    assert cosine_schedule(total - 1, total, 1.0, 0.1, warmup) == pytest.approx(expected_last)
    assert cosine_schedule(total + 5, total, 1.0, 0.1, warmup) == 0.1
    # Weight decay rises 0.04 -> 0.4; momentum 0.996 -> 1.
    assert cosine_schedule(0, total, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(total // 2, total, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(total - 1, total, 0.996, 1.0) == pytest.approx(1.0, abs=1e-5)


def test_teacher_temperature_per_epoch():
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [teacher_temperature(e, 0.07, 0.04, 30) for e in range(100)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert teacher_temperature(0, 0.04, 0.04, 0) == 0.04
