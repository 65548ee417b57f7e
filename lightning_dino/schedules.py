"""Stateless schedules: each value is a pure function of the step (or epoch) counter.

They reproduce `cosine_scheduler` and the teacher-temperature schedule of facebookresearch/dino
(`utils.py`, `main_dino.py`) value for value, so resuming from a checkpoint continues them exactly.
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warmup then a cosine from ``start`` to ``end``, as in DINO's ``cosine_scheduler``.

    During warmup the value goes linearly from ``warmup_start`` at step 0 to ``start`` at step
    ``warmup_steps - 1``. After it, ``end + (start - end) * (1 + cos(pi * i / n)) / 2`` with
    ``i = step - warmup_steps`` and ``n = total_steps - warmup_steps``. Like the reference, the
    last step (``i = n - 1``) stops just short of ``end``. Steps past the end return ``end``.

    Args:
        step: Zero-based optimizer step.
        total_steps: Number of optimizer steps in the whole run.
        start: Value at the end of warmup (the peak for a learning rate).
        end: Value the cosine decays (or rises) to.
        warmup_steps: Number of linear warmup steps.
        warmup_start: Value at step 0 when there is a warmup.

    Returns:
        The scheduled value at ``step``.
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (start - warmup_start) * step / (warmup_steps - 1)
    n = total_steps - warmup_steps
    i = step - warmup_steps
    if n <= 0 or i >= n:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * i / n))


def teacher_temperature(
    epoch: int, teacher_temp: float, warmup_temp: float, warmup_epochs: int
) -> float:
    """Teacher temperature for an epoch: linear from ``warmup_temp`` over the warmup, then constant.

    The reference indexes this schedule by epoch (not by step): ``linspace(warmup_temp,
    teacher_temp, warmup_epochs)`` for the first ``warmup_epochs`` epochs, ``teacher_temp`` after.

    Args:
        epoch: Zero-based epoch.
        teacher_temp: Final teacher temperature (0.04 CLI default, 0.07 in the paper recipe).
        warmup_temp: Teacher temperature at epoch 0.
        warmup_epochs: Length of the linear warmup in epochs.

    Returns:
        The teacher temperature for ``epoch``.
    """
    if epoch >= warmup_epochs:
        return teacher_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (teacher_temp - warmup_temp) * epoch / (warmup_epochs - 1)
