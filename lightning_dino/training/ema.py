"""The momentum teacher: a pure EMA update and the callback applying it once per optimizer step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_dino.networks.sharding import local, reshard
from lightning_dino.training.schedules import cosine_schedule


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Update the teacher in place: ``theta_t <- m * theta_t + (1 - m) * theta_s``.

    Runs over *all* parameters of both modules in the same order, frozen ones (such as a frozen
    weight-norm magnitude) included, as the reference does; buffers are left alone. Uses
    ``torch._foreach_lerp_`` (one fused call, no per-parameter Python loop).

    Args:
        teacher: The EMA copy, updated in place.
        student: The trained network with the same architecture.
        momentum: EMA momentum m in [0, 1].

    Examples:
        >>> teacher, student = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> _ = teacher.weight.data.fill_(1.0), student.weight.data.fill_(0.0)
        >>> ema_update(teacher, student, momentum=0.9)
        >>> round(teacher.weight.item(), 4)
        0.9
    """
    reshard(teacher)  # sharded: its slices, not the weights a forward gathered
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters but student has {len(student_params)}; "
            "they must be the same architecture"
        )
    if momentum == 1.0:
        return
    # Sharded networks: each rank moves its own slices (teacher and student are sharded alike).
    torch._foreach_lerp_([local(p) for p in teacher_params],
                         [local(p.detach()) for p in student_params], 1.0 - momentum)


class TeacherEMA(Callback):
    """Moves ``pl_module.teacher`` towards ``pl_module.student`` after every optimizer step.

    ``target`` names another attribute to move (a distillation run keeps an EMA of its student
    in ``pl_module.ema``; its teacher is frozen).

    The momentum follows a cosine from ``base_momentum`` to ``final_momentum`` over all optimizer
    steps of the run (``trainer.estimated_stepping_batches``), indexed by ``global_step``. The
    update happens in ``on_train_batch_end`` only when ``global_step`` advanced, so under gradient
    accumulation the teacher moves once per optimizer step, not once per micro-batch.

    Args:
        base_momentum: Momentum at step 0 (0.996 in the paper).
        final_momentum: Momentum at the end of training (1.0).
        target: The attribute of the module that follows ``pl_module.student``; its momentum
            is logged as ``train/<target>_momentum``.
        copy_buffers: Also copy the student's buffers (BatchNorm statistics) into the target
            after each update, for a target that never runs during training (an EMA kept as the
            final model); DINO's teacher keeps its own, from its forwards.

    Examples:
        >>> ema = TeacherEMA(base_momentum=0.996)  # DINO adds one itself (configure_callbacks)
        >>> ema.momentum(0, total_steps=100), ema.momentum(100, total_steps=100)
        (0.996, 1.0)
    """

    def __init__(
        self,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        target: str = "teacher",
        copy_buffers: bool = False,
    ) -> None:
        if not 0.0 <= base_momentum <= 1.0 or not 0.0 <= final_momentum <= 1.0:
            raise ValueError(
                f"teacher momentum must be in [0, 1], got {base_momentum} -> {final_momentum}"
            )
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.target = target
        self.copy_buffers = copy_buffers
        self._last_step = -1
        self._total_steps = 1

    def momentum(self, step: int, total_steps: int) -> float:
        """Teacher momentum used after optimizer step ``step`` (zero-based)."""
        return cosine_schedule(step, total_steps, self.base_momentum, self.final_momentum)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the step the run (or resumed run) starts at and the run length."""
        self._last_step = trainer.global_step
        self._total_steps = int(trainer.estimated_stepping_batches)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Apply the EMA when an optimizer step was taken since the last call."""
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        m = self.momentum(step - 1, self._total_steps)
        target = getattr(pl_module, self.target)
        ema_update(target, pl_module.student, m)
        buffers = list(target.buffers())
        if self.copy_buffers and buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, list(pl_module.student.buffers()))
        pl_module.log(f"train/{self.target}_momentum", m, on_step=True, on_epoch=False)
