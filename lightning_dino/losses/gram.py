"""Gram anchoring (DINOv3): the student's patch similarities held close to an earlier teacher's.

Long runs keep improving global features while patch features get noisy; anchoring the
pairwise similarity structure of the patches to an earlier, cleaner teacher keeps them clean.

Reference: Siméoni et al., *DINOv3*, 2025 (arXiv 2508.10104), section 4; ``GramLoss`` of
facebookresearch/dinov3 ``dinov3/loss/gram_loss.py``.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.precision import full_precision


class GramLoss(nn.Module):
    """Mean squared error between the patch Gram matrices of the student and the Gram teacher.

    Each image's patch features are L2-normalised and their pairwise cosine similarities
    ``X X^T`` (N, N) compared; negative similarities are set to 0 first (in both matrices by
    default, or only where the teacher's is negative). Computed in fp32.

    Args:
        remove_negatives: ``"both"`` (DINOv3's default), ``"teacher"`` (zero both where the
            teacher's similarity is negative) or ``"none"``.

    Examples:
        >>> loss = GramLoss()(torch.randn(2, 16, 8), torch.randn(2, 16, 8))
    """

    def __init__(self, remove_negatives: Literal["both", "teacher", "none"] = "both") -> None:
        super().__init__()
        if remove_negatives not in ("both", "teacher", "none"):
            raise ValueError(f"remove_negatives: both, teacher or none, not {remove_negatives!r}")
        self.remove_negatives = remove_negatives

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        """The loss of a batch.

        Args:
            student_patches: Student patch features (B, N, D).
            teacher_patches: Gram teacher patch features at the same positions (B, N, D').

        Returns:
            Scalar fp32 loss: the mean over images and matrix entries of the squared differences.
        """
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(
                "student and teacher patches must be (B, N, D) with the same B and N, got "
                f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
            )
        with full_precision(student_patches.device):
            s = F.normalize(student_patches.float(), dim=-1)
            t = F.normalize(teacher_patches.detach().float(), dim=-1)
            student_sim, teacher_sim = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
            if self.remove_negatives == "both":
                student_sim, teacher_sim = student_sim.clamp(min=0), teacher_sim.clamp(min=0)
            elif self.remove_negatives == "teacher":
                negative = teacher_sim < 0
                student_sim = student_sim.masked_fill(negative, 0.0)
                teacher_sim = teacher_sim.masked_fill(negative, 0.0)
            return F.mse_loss(student_sim, teacher_sim)
