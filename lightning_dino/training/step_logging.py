"""What a training step logs.

The losses every step; schedules and collapse diagnostics on the steps the loggers record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_dino.eval.diagnostics import collapse_statistics, teacher_entropy_ratio


@dataclass
class PrototypeScores:
    """A step's prototype scores, which the collapse diagnostics read (methods with a DINO head).

    Attributes:
        student_out: Student logits (n_crops, B, K).
        teacher_out: Raw teacher logits (n_global, B, K).
        center: The teacher centre (1, K).
        student_temp: Student temperature.
        teacher_temp: This step's teacher temperature.
    """

    student_out: Tensor
    teacher_out: Tensor
    center: Tensor
    student_temp: float
    teacher_temp: float


@dataclass
class StepResult:
    """What a method's step computed: its loss, the parts to log and what the diagnostics read.

    Attributes:
        loss: The total loss (scalar).
        batch_size: Images per process in the step.
        losses: Each part of the loss by log key (``train/dino_loss``, ``train/ibot_loss`` ...);
            logged when there is more than one.
        prototypes: The step's prototype scores for the collapse diagnostics; None for a method
            without prototypes (its step logs the losses and schedules only).
    """

    loss: Tensor
    batch_size: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    prototypes: PrototypeScores | None = None


def log_step(module: pl.LightningModule, result: StepResult) -> dict[str, Any]:
    """Log one step of a method and return ``training_step``'s output.

    Args:
        module: The module training.
        result: What its step computed.

    Returns:
        ``{"loss": loss}``, with ``"diagnostics"`` when the step has prototype scores (see
        :func:`log_training_step`).
    """
    scores = result.prototypes
    if scores is not None:
        return log_training_step(
            module, result.loss, result.losses, scores.student_out, scores.teacher_out,
            scores.center, scores.student_temp, scores.teacher_temp,
        )
    log_losses(module, result.loss, result.losses, result.batch_size)
    if writes_logs_this_step(module.trainer):
        log_schedules(module, {}, result.batch_size)
    return {"loss": result.loss}


def writes_logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers record this step (every ``log_every_n_steps``, and at the end).

    Schedule values and collapse diagnostics are computed and logged only on those steps: values
    logged on other steps never reach a logger. Lightning's own monitors
    (``LearningRateMonitor``, ``ThroughputMonitor``) ask the logger connector the same way.
    """
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def log_training_step(
    module: pl.LightningModule,
    loss: Tensor,
    terms: dict[str, Tensor],
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> dict[str, Tensor | dict[str, Tensor]]:
    """Log one step of a self-distillation method and return ``training_step``'s output.

    Every step: ``train/loss``, each term (when there is more than one) and the epoch mean
    ``train/loss_epoch`` (for ``ModelCheckpoint`` / ``EarlyStopping``), all averaged over
    processes. On logging steps also the learning rate, weight decay, teacher temperature and
    every :func:`~lightning_dino.eval.diagnostics.collapse_statistics`.

    Args:
        module: The module training.
        loss: The total loss.
        terms: Each term's loss by log key.
        student_out: Student logits (n_crops, B, K).
        teacher_out: Raw teacher logits (n_global, B, K).
        center: The teacher centre (1, K).
        student_temp: Student temperature.
        teacher_temp: This step's teacher temperature.

    Returns:
        ``{"loss": loss, "diagnostics": {...}}``: the diagnostics hold at least the
        ``teacher_entropy_ratio`` the :class:`~lightning_dino.eval.CollapseMonitor` reads.
    """
    log_losses(module, loss, terms, student_out.shape[1])
    if not writes_logs_this_step(module.trainer):
        # The CollapseMonitor needs the entropy ratio every step; the rest only feeds the logs.
        ratio = teacher_entropy_ratio(teacher_out, center, teacher_temp)
        return {"loss": loss, "diagnostics": {"teacher_entropy_ratio": ratio}}
    diagnostics = collapse_statistics(student_out, teacher_out, center, student_temp, teacher_temp)
    log_schedules(
        module,
        {
            "train/teacher_temp": teacher_temp,
            **{f"diagnostics/{name}": value for name, value in diagnostics.items()},
        },
        student_out.shape[1],
    )
    return {"loss": loss, "diagnostics": diagnostics}


def log_losses(
    module: pl.LightningModule, loss: Tensor, terms: dict[str, Tensor], batch_size: int
) -> None:
    """Log ``train/loss``, each term (when there is more than one) and ``train/loss_epoch``.

    All averaged over processes; ``train/loss_epoch`` is the epoch mean (for
    ``ModelCheckpoint`` / ``EarlyStopping``).

    Args:
        module: The module training.
        loss: The total loss.
        terms: Each term's loss by log key.
        batch_size: Images per process in the step.
    """
    module.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
    if len(terms) > 1:
        module.log_dict(terms, batch_size=batch_size, sync_dist=True)
    module.log(
        "train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=batch_size,
        sync_dist=True,
    )


def log_schedules(module: pl.LightningModule, extra: dict[str, Any], batch_size: int) -> None:
    """Log the learning rate and weight decay this step used, and ``extra`` values.

    Args:
        module: The module training (its first optimizer group is the decay group).
        extra: More values by log key (a temperature, diagnostics).
        batch_size: Images per process in the step.
    """
    decay_group = module.optimizers().optimizer.param_groups[0]
    module.log_dict(
        {
            "train/lr": decay_group["lr"],
            "train/weight_decay": decay_group["weight_decay"],
            **extra,
        },
        batch_size=batch_size,
    )
