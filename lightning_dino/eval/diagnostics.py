"""Collapse diagnostics for DINO: teacher entropy, teacher-student KL, and a warning callback.

DINO avoids collapse by balancing centring (pushes the teacher towards uniform) against
sharpening with a low teacher temperature (pushes it towards one-hot); see Caron et al. 2021, §5.3
and Fig. 7, which track exactly the teacher entropy and the teacher-student KL. Two failure modes
show up in these statistics long before a k-NN evaluation would:

* uniform collapse: teacher entropy ~ ln K and a loss flat at ln K (no sharpening);
* one-hot collapse: teacher entropy -> 0 (centring missing, too slow, or too weak).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_dino.losses.precision import full_precision

UNIFORM_ADVICE = (
    "the teacher output is near-uniform (entropy ratio {ratio:.3f} > {threshold} for {steps} "
    "steps; the loss sits near ln K): lower the teacher temperature or warm it up from 0.04 "
    "(teacher_temp/warmup_teacher_temp), and raise the teacher momentum (0.996-0.9995)."
)
ONE_HOT_ADVICE = (
    "the teacher output is near-one-hot (entropy ratio {ratio:.3f} < {threshold} for {steps} "
    "steps): check that centring is on with center_momentum 0.9, raise the teacher temperature, "
    "and lower out_dim for small datasets."
)


@torch.no_grad()
def collapse_statistics(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> dict[str, Tensor]:
    """Summarise how close the teacher is to either collapse mode, in fp32 and without grad.

    The teacher distribution is ``P_t = softmax((t - center) / teacher_temp)`` (as in the loss)
    and the student's is ``P_s = softmax(s / student_temp)``.

    Args:
        student_out: Student logits, shape (n_crops, B, K); crops ``0..n_global-1`` are the same
            views as the teacher's.
        teacher_out: Raw (uncentred) teacher logits of the global crops, shape (n_global, B, K).
        center: The loss centre, shape (1, K).
        student_temp: Student temperature.
        teacher_temp: Teacher temperature for this step.

    Returns:
        Scalar float32 tensors:

        * ``teacher_entropy``: mean per-sample entropy of ``P_t`` in nats;
        * ``teacher_entropy_ratio``: that entropy over ln K (1 = uniform, 0 = one-hot);
        * ``teacher_student_kl``: mean ``KL(P_t || P_s)`` over the loss's pairs (teacher view t,
            student view v != t) and the batch;
        * ``center_norm``: L2 norm of the centre;
        * ``teacher_max_prob``: mean largest probability of ``P_t``.

    Examples:
        >>> stats = collapse_statistics(torch.randn(4, 8, 16), torch.zeros(2, 8, 16),
        ...                             torch.zeros(1, 16), 0.1, 0.04)
        >>> round(stats["teacher_entropy_ratio"].item(), 4)
        1.0
    """
    with full_precision(teacher_out.device):
        n_global, num_out = teacher_out.shape[0], teacher_out.shape[-1]
        teacher_log_p = ((teacher_out.float() - center.float()) / teacher_temp).log_softmax(dim=-1)
        student_log_p = (student_out.float() / student_temp).log_softmax(dim=-1)
        teacher_p = teacher_log_p.exp()
        entropy = -(teacher_p * teacher_log_p).sum(dim=-1)  # (n_global, B)
        # cross_entropy[t, v, b] = H(P_t of teacher view t, P_s of student view v) for sample b
        cross_entropy = -torch.einsum("tbk,vbk->tvb", teacher_p, student_log_p)
        kl = cross_entropy - entropy[:, None, :]
        same_view = torch.eye(n_global, student_out.shape[0], dtype=torch.bool, device=kl.device)
        mean_entropy = entropy.mean()
        return {
            "teacher_entropy": mean_entropy,
            "teacher_entropy_ratio": mean_entropy / math.log(num_out),
            "teacher_student_kl": kl[~same_view].mean(),
            "center_norm": center.float().norm(),
            "teacher_max_prob": teacher_p.amax(dim=-1).mean(),
        }


@torch.no_grad()
def teacher_entropy_ratio(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """The ``teacher_entropy_ratio`` of :func:`collapse_statistics`, alone and cheaper.

    Args:
        teacher_out: Raw teacher logits, shape (n_global, B, K).
        center: The loss centre, shape (1, K).
        teacher_temp: Teacher temperature for this step.

    Returns:
        Scalar float32 tensor: mean entropy of ``softmax((t - center) / teacher_temp)`` over ln K.
    """
    with full_precision(teacher_out.device):
        log_p = ((teacher_out.float() - center.float()) / teacher_temp).log_softmax(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1).mean()
    return entropy / math.log(teacher_out.shape[-1])


class CollapseMonitor(Callback):
    """Warn once per mode when the teacher stays near-uniform or near-one-hot.

    Each training batch the callback reads ``outputs["diagnostics"]["teacher_entropy_ratio"]`` (as
    returned by the DINO module's ``training_step``, computed by :func:`collapse_statistics`).
    When the ratio stays above ``uniform_ratio`` or below ``one_hot_ratio`` for
    ``patience_steps`` consecutive batches, it emits one warning (rank zero) with advice. Each
    mode warns at most once per fit. If the outputs carry no diagnostics, it says so once and does
    nothing.

    Args:
        patience_steps: Consecutive batches in a mode before warning.
        uniform_ratio: Entropy ratio above which the teacher counts as near-uniform.
        one_hot_ratio: Entropy ratio below which the teacher counts as near-one-hot.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[CollapseMonitor(patience_steps=200)])  # doctest: +SKIP
    """

    def __init__(
        self, patience_steps: int = 100, uniform_ratio: float = 0.98, one_hot_ratio: float = 0.02
    ) -> None:
        if not 0.0 <= one_hot_ratio < uniform_ratio <= 1.0:
            raise ValueError(
                "CollapseMonitor needs 0 <= one_hot_ratio < uniform_ratio <= 1, got "
                f"one_hot_ratio={one_hot_ratio}, uniform_ratio={uniform_ratio}"
            )
        self.patience_steps = patience_steps
        self.thresholds = {"uniform": uniform_ratio, "one_hot": one_hot_ratio}
        self.streaks = {"uniform": 0, "one_hot": 0}
        self.warned: set[str] = set()
        self._missing_reported = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Update the streak counters from this batch's diagnostics and warn when one is long."""
        ratio = self._entropy_ratio(outputs)
        if ratio is None:
            return
        in_mode = {
            "uniform": ratio > self.thresholds["uniform"],
            "one_hot": ratio < self.thresholds["one_hot"],
        }
        for mode, active in in_mode.items():
            self.streaks[mode] = self.streaks[mode] + 1 if active else 0
            if self.streaks[mode] >= self.patience_steps and mode not in self.warned:
                self.warned.add(mode)
                advice = UNIFORM_ADVICE if mode == "uniform" else ONE_HOT_ADVICE
                message = advice.format(
                    ratio=ratio, threshold=self.thresholds[mode], steps=self.patience_steps
                )
                rank_zero_warn(f"CollapseMonitor at step {trainer.global_step}: {message}")

    def _entropy_ratio(self, outputs: Any) -> float | None:
        """The teacher entropy ratio from a training step's outputs, or None if absent."""
        diagnostics = outputs.get("diagnostics") if isinstance(outputs, dict) else None
        if diagnostics is None or "teacher_entropy_ratio" not in diagnostics:
            if not self._missing_reported:
                rank_zero_info(
                    "CollapseMonitor: training_step outputs have no "
                    "['diagnostics']['teacher_entropy_ratio']; the monitor does nothing."
                )
            self._missing_reported = True
            return None
        return float(diagnostics["teacher_entropy_ratio"])
