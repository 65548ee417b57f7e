"""Stateless schedules: each value is a pure function of the step (or epoch) counter.

:class:`StepScheduler` applies two of them (learning rate, weight decay) to an optimizer, as
the scheduler object Lightning steps after every optimizer step.

They reproduce `cosine_scheduler` and the teacher-temperature schedule of facebookresearch/dino
(`utils.py`, `main_dino.py`) value for value, so resuming from a checkpoint continues them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


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


class StepScheduler(LRScheduler):
    """Sets each optimizer step's learning rate and weight decay from two step functions.

    Return it from ``configure_optimizers`` with ``"interval": "step"``: Lightning steps it after
    every optimizer step, so the optimizer holds the values of step ``s`` while step ``s`` runs
    and ``LearningRateMonitor`` logs the learning rate each step actually used. The values stay
    pure functions of the step: :meth:`sync` sets them for any step (after a resume, or after a
    change of the run length), and the saved state is only the step counter.

    Args:
        optimizer: The optimizer; groups with ``apply_weight_decay`` (or named ``"decay"``) get
            the weight decay, others 0; a group's ``lr_scale`` (default 1) scales its lr.
        lr_at: Learning rate of a zero-based optimizer step.
        weight_decay_at: Weight decay of a zero-based optimizer step.
        backbone_factor_at: Extra factor of the groups marked ``backbone`` at a step (None: 1).

    Examples:
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.0)
        >>> scheduler = StepScheduler(optimizer, lr_at=lambda step: 0.1 / (1 + step),
        ...                           weight_decay_at=lambda step: 0.04)
        >>> optimizer.param_groups[0]["lr"]  # step 0's value, set at once
        0.1
        >>> optimizer.step(); scheduler.step()
        >>> optimizer.param_groups[0]["lr"]
        0.05
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_at: Callable[[int], float],
        weight_decay_at: Callable[[int], float],
        backbone_factor_at: Callable[[int], float] | None = None,
    ) -> None:
        self.lr_at = lr_at
        self.weight_decay_at = weight_decay_at
        self.backbone_factor_at = backbone_factor_at
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """The learning rate of step ``last_epoch`` for every group, times its ``lr_scale``.

        Groups marked ``backbone`` are also scaled by ``backbone_factor_at`` (a warm-up).
        """
        lr = self.lr_at(self.last_epoch)
        factor = self.backbone_factor_at(self.last_epoch) if self.backbone_factor_at else 1.0
        return [
            lr * group.get("lr_scale", 1.0) * (factor if group.get("backbone") else 1.0)
            for group in self.optimizer.param_groups
        ]

    def step(self, epoch: int | None = None) -> None:
        """Move to the next step and set its learning rate and weight decay."""
        super().step(epoch)
        self._set_weight_decay()

    def sync(self, step: int) -> None:
        """Set the values of ``step`` now, whatever the scheduler's own counter says.

        Args:
            step: The zero-based optimizer step about to run (``trainer.global_step``).
        """
        self.last_epoch = step
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs
        self._set_weight_decay()

    def state_dict(self) -> dict[str, Any]:
        """The step counter (the step functions belong to the module, not the checkpoint)."""
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter.

        Args:
            state_dict: A :meth:`state_dict`.
        """
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]

    def _set_weight_decay(self) -> None:
        wd = self.weight_decay_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            decays = group.get("apply_weight_decay", group.get("name") == "decay")
            group["weight_decay"] = wd if decays else 0.0


def run_length(trainer: pl.Trainer) -> tuple[int, int]:
    """The optimizer steps of the whole run and of one epoch, as the per-step schedules use them.

    Args:
        trainer: The trainer, at the start of ``fit`` (its loaders are known).

    Returns:
        ``(total_steps, steps_per_epoch)``, both at least 1.
    """
    total_steps = int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    else:
        per_epoch = max(1, total_steps // max(1, trainer.max_epochs or 1))
    return total_steps, per_epoch


def global_batch_size(trainer: pl.Trainer) -> int:
    """Per-device batch x devices x gradient accumulation, the batch the lr is scaled by.

    The per-device batch is the data module's ``batch_size`` or the training loader's.
    """
    per_device = getattr(trainer.datamodule, "batch_size", None)
    if per_device is None:
        per_device = trainer.train_dataloader.batch_size
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches
