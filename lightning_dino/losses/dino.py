"""The DINO self-distillation loss and its centre.

Reference: Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021,
Eq. 3-4 and Algorithm 1; the official `DINOLoss` in facebookresearch/dino `main_dino.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dino.losses.center import EMACenter
from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.sinkhorn_knopp import sinkhorn_knopp


class DINOLoss(EMACenter):
    """Cross-entropy between a centred, sharpened teacher and the student, over crop pairs.

    For every teacher view ``t`` (the global crops) and every student view ``v != t`` the loss
    takes the batch mean of ``-sum_k softmax((t - c) / tau_t)_k * log_softmax(v / tau_s)_k`` and
    averages these terms over the ``n_global * n_crops - n_global`` pairs. Softmax, centring and
    the loss run in fp32 whatever the input dtype.

    The centre ``c`` is an EMA of the batch mean of the raw teacher logits, averaged over every
    process of a distributed run. In training mode a call updates it *after* computing the loss
    (with the old centre), as the reference does. Under gradient accumulation set
    ``defer_center_update = True``: each call then only accumulates the teacher statistics and
    :meth:`update_center` applies them once per optimizer step (the `DINO` module does this).

    Args:
        out_dim: Number of prototypes K (the head's output dimension).
        student_temp: Student softmax temperature tau_s.
        center_momentum: EMA momentum of the centre (0.9 in the paper; 0.999 collapses; 1.0
            never moves the centre from 0, i.e. no centring, for ablations).
        centering: ``"center"`` (DINO: subtract the EMA centre, softmax at ``teacher_temp``) or
            ``"sinkhorn_knopp"`` (DINOv2's option: 3 Sinkhorn-Knopp iterations over all global
            crops of the batch, every rank's; the centre is then not used).
        local_weight: Factor on the pairs whose student view is a local crop (1.0: every pair
            counts equally, DINO's and DINOv2's loss). DINOv3's Gram and high-resolution phases
            scale them down (``dino.reweight_dino_local_loss``, 0.5) without renormalising:
            the loss is ``(sum of global pairs + local_weight * sum of local pairs) / n_pairs``.

    Attributes:
        center: Buffer of shape (1, K).
        defer_center_update: When True, calls only accumulate statistics for the centre.

    Examples:
        >>> loss_fn = DINOLoss(out_dim=16)
        >>> student = torch.randn(4, 8, 16)  # 2 global + 2 local crops, batch 8
        >>> teacher = torch.randn(2, 8, 16)
        >>> loss = loss_fn(student, teacher, teacher_temp=0.04)
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        local_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if local_weight < 0:
            raise ValueError(f"local_weight must be >= 0, got {local_weight}")
        self.local_weight = local_weight
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"centering must be center or sinkhorn_knopp, got {centering!r}")
        self.centering = centering
        if out_dim < 2:
            raise ValueError(f"out_dim must be >= 2 for a softmax over prototypes, got {out_dim}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.defer_center_update = False
        self.init_center(out_dim)

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        """Compute the loss and, in training mode, update (or accumulate) the centre.

        Args:
            student_out: Student logits, shape (n_crops, B, K); crops ``0..n_global-1`` are the
                same views as the teacher's.
            teacher_out: Raw teacher logits of the global crops, shape (n_global, B, K).
            teacher_temp: Teacher temperature tau_t for this step.

        Returns:
            Scalar loss: mean over pairs of the batch-mean cross-entropy.
        """
        n_global = teacher_out.shape[0]
        n_crops = student_out.shape[0]
        if student_out.shape[1:] != teacher_out.shape[1:] or n_crops < n_global:
            raise ValueError(
                "expected student_out (n_crops, B, K) and teacher_out (n_global, B, K) with "
                f"n_crops >= n_global; got {tuple(student_out.shape)} and "
                f"{tuple(teacher_out.shape)}"
            )
        if n_crops == 1:
            raise ValueError("the DINO loss needs at least 2 crops (no pair with v != t)")
        with full_precision(student_out.device):
            loss, teacher_raw = self._pairwise_cross_entropy(student_out, teacher_out, teacher_temp)
            if self.training and self.centering == "center":
                self.accumulate_center(teacher_raw)
                if not self.defer_center_update:
                    self.update_center()
        return loss

    def _pairwise_cross_entropy(
        self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor]:
        """The loss (fp32 scalar) and the raw fp32 teacher logits; see :meth:`forward`."""
        n_global, n_crops = teacher_out.shape[0], student_out.shape[0]
        log_p_student = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        teacher_raw = teacher_out.detach().float()
        if self.centering == "sinkhorn_knopp":
            flat = teacher_raw.reshape(-1, teacher_raw.shape[-1])
            p_teacher = sinkhorn_knopp(flat, teacher_temp).reshape(teacher_raw.shape)
        else:
            p_teacher = F.softmax((teacher_raw - self.center.float()) / teacher_temp, dim=-1)
        # ce[t, v] = batch mean of -sum_k p_t * log p_v for every (teacher view, student view).
        ce = -torch.einsum("tbk,vbk->tv", p_teacher, log_p_student) / student_out.shape[1]
        same_view = torch.eye(n_global, n_crops, dtype=torch.bool, device=ce.device)
        ce = ce.masked_fill(same_view, 0.0)
        if self.local_weight != 1.0:
            ce = torch.cat([ce[:, :n_global], self.local_weight * ce[:, n_global:]], dim=1)
        loss = ce.sum() / (n_global * n_crops - n_global)
        return loss, teacher_raw
