"""Gram anchoring (DINOv3): the student's patch similarities held close to an earlier teacher's.

Long runs keep improving global features while patch features get noisy; anchoring the
pairwise similarity structure of the patches to an earlier, cleaner teacher keeps them clean.

Reference: Siméoni et al., *DINOv3*, 2025 (arXiv 2508.10104), section 4; ``GramLoss`` of
facebookresearch/dinov3 ``dinov3/loss/gram_loss.py``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.term import LossTerm
from lightning_dino.naming import setting
from lightning_dino.networks.backbones import MultiCropNetwork, is_vit, vit_tokens
from lightning_dino.networks.forward import TOKENS, StepOutputs


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


class GramTerm(LossTerm):
    """DINOv3's Gram anchoring term of :class:`~lightning_dino.DINO`.

    The Gram teacher is a frozen snapshot of the EMA teacher's backbone, taken at
    ``start_step`` and refreshed every ``update_every`` steps after it; from ``start_step`` on,
    :class:`GramLoss` holds the student's patch similarities of the global crops close to the
    Gram teacher's on the same crops.

    Args:
        weight: The term's weight.
        teacher_backbone: The EMA teacher's backbone (a timm ViT); copied, not shared.
        start_step: Optimizer step at which the snapshot is taken and the term starts.
        update_every: Steps between refreshes after the start; 0 keeps the first snapshot.

    Raises:
        ValueError: If the backbone is not a ViT (no patch tokens).
    """

    name = "gram"
    needs = frozenset({TOKENS})

    def __init__(
        self, weight: float, teacher_backbone: nn.Module, start_step: int = 0, update_every: int = 0
    ) -> None:
        super().__init__(weight)
        if not is_vit(teacher_backbone):
            raise ValueError(
                f"{setting('model', 'gram_loss_weight')} needs a ViT backbone (patch tokens)"
            )
        self.teacher = copy.deepcopy(teacher_backbone).requires_grad_(False)
        self.loss = GramLoss()
        self.start_step = start_step
        self.update_every = update_every

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> GramTerm | None:
        """On when ``gram_loss_weight`` > 0."""
        if hparams.gram_loss_weight <= 0:
            return None
        return cls(
            hparams.gram_loss_weight,
            teacher.backbone,
            hparams.gram_start_step,
            hparams.gram_update_every,
        )

    def active(self, step: int) -> bool:
        """From ``start_step`` on."""
        return step >= self.start_step

    def before_batch(self, step: int, teacher: MultiCropNetwork) -> None:
        """Take a new snapshot of the EMA teacher's backbone when one is due."""
        since = step - self.start_step
        every = self.update_every
        if since == 0 or (every > 0 and since > 0 and since % every == 0):
            self.teacher.load_state_dict(teacher.backbone.state_dict())

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """Gram loss of the student's global patch tokens against the Gram teacher's."""
        with torch.no_grad():
            anchors = vit_tokens(self.teacher, torch.cat(outputs.crops[: outputs.n_global]))
        return self.loss(outputs.patch_tokens, anchors[:, self.teacher.num_prefix_tokens :])
