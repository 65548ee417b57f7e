"""Gram anchoring (DINOv3): the student's patch similarities held close to an earlier teacher's.

Long runs keep improving global features while patch features get noisy; anchoring the
pairwise similarity structure of the patches to an earlier, cleaner teacher keeps them clean.

Reference: Siméoni et al., *DINOv3*, 2025 (arXiv 2508.10104), section 4; ``GramLoss`` of
facebookresearch/dinov3 ``dinov3/loss/gram_loss.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.term import Check, LossTerm
from lightning_dino.networks.backbones import MultiCropNetwork, is_vit
from lightning_dino.networks.forward import TOKENS, StepOutputs
from lightning_dino.networks.tokens import check_token_backbone, token_forward
from lightning_dino.setting_names import setting


class GramLoss(nn.Module):
    """Mean squared error between the patch Gram matrices of the student and the Gram teacher.

    Each image's patch features are L2-normalised and their pairwise cosine similarities
    ``X X^T`` (N, N) compared. Computed in fp32.

    Args:
        remove_negatives: Set negative similarities to 0 in both matrices first (the default of
            DINOv3's ``GramLoss`` class). False (the default here) keeps them: both shipped
            DINOv3 training configs set ``remove_neg: false``, anchoring dissimilar patches too.

    Examples:
        >>> loss = GramLoss()(torch.randn(2, 16, 8), torch.randn(2, 16, 8))
    """

    def __init__(self, remove_negatives: bool = False) -> None:
        super().__init__()
        if not isinstance(remove_negatives, bool):
            raise ValueError(f"remove_negatives must be True or False, not {remove_negatives!r}")
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
            if self.remove_negatives:
                student_sim, teacher_sim = student_sim.clamp(min=0), teacher_sim.clamp(min=0)
            return F.mse_loss(student_sim, teacher_sim)


class GramTerm(LossTerm):
    """DINOv3's Gram anchoring term of :class:`~lightning_dino.DINO`.

    The Gram teacher is a frozen snapshot of the EMA teacher's backbone, taken at
    ``start_step`` and refreshed every ``update_every`` steps after it (at most ``max_updates``
    times); from ``start_step`` on, :class:`GramLoss` holds the student's patch similarities of
    the global crops close to the Gram teacher's. With ``image_size`` the Gram teacher sees the
    global crops resized to that size and its patch features are resized back to the student's
    patch grid, as DINOv3 gives its Gram teacher higher-resolution crops.

    Arguments of :class:`~lightning_dino.DINO` (``--model.*``), each the argument below without
    its ``gram_`` prefix:

    - ``gram_loss_weight``: the weight (0 = off). Needs a ViT backbone (patch tokens).
    - ``gram_start_step``: the optimizer step at which the Gram teacher is taken and the loss
      starts (DINOv3 starts late in a long run); a start at or past the run's end warns.
    - ``gram_update_every``, ``gram_max_updates``: refreshes after the start (0: never; 0: no
      limit, DINOv3's ``max_updates``).
    - ``gram_remove_negatives``: see :class:`GramLoss` (False anchors negative similarities,
      as DINOv3's training configs).
    - ``gram_image_size``: the side of the Gram teacher's input (0: the student's crops).

    Args:
        weight: The term's weight.
        teacher_backbone: The EMA teacher's backbone (a timm ViT); copied, not shared.
        start_step: Optimizer step at which the snapshot is taken and the term starts.
        update_every: Steps between refreshes after the start; 0 keeps the first snapshot.
        max_updates: At most this many refreshes after the first snapshot; 0 = no limit.
        remove_negatives: See :class:`GramLoss`.
        image_size: Side of the Gram teacher's input (bicubic resize of the global crops); 0
            feeds it the student's global crops as they are.

    Raises:
        ValueError: If the backbone is not a ViT (no patch tokens).
    """

    name = "gram"
    needs = frozenset({TOKENS})

    def __init__(
        self,
        weight: float,
        teacher_backbone: nn.Module,
        start_step: int = 0,
        update_every: int = 0,
        max_updates: int = 0,
        remove_negatives: bool = False,
        image_size: int = 0,
    ) -> None:
        super().__init__(weight)
        if not is_vit(teacher_backbone):
            raise ValueError("GramTerm needs a ViT teacher backbone (patch tokens)")
        self.teacher = copy.deepcopy(teacher_backbone).requires_grad_(False)
        self.loss = GramLoss(remove_negatives)
        self.start_step = start_step
        self.update_every = update_every
        self.max_updates = max_updates
        self.image_size = image_size

    @classmethod
    def argument_checks(cls, hparams: Any) -> list[Check]:
        """The weight, start step, refreshes, and the Gram teacher's image size."""
        return [
            *super().argument_checks(hparams),
            (hparams.gram_start_step >= 0, "gram_start_step", "use a step >= 0"),
            (hparams.gram_update_every >= 0, "gram_update_every", "use 0 (never) or a step count"),
            (hparams.gram_max_updates >= 0, "gram_max_updates", "use 0 (no limit) or a count"),
            (hparams.gram_image_size >= 0, "gram_image_size", "use 0 (the crops) or a side"),
        ]

    @classmethod
    def check_backbone(cls, backbone: nn.Module, feature_dim: int, owner: object) -> None:
        """A timm ViT whose tokens the token forward reads: the loss compares patch tokens."""
        check_token_backbone(backbone, owner, cls.weight_key())

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> GramTerm:
        """The term with its Gram teacher copied from the EMA teacher's backbone."""
        return cls(
            hparams.gram_loss_weight,
            teacher.backbone,
            hparams.gram_start_step,
            hparams.gram_update_every,
            hparams.gram_max_updates,
            hparams.gram_remove_negatives,
            hparams.gram_image_size,
        )

    @classmethod
    def resume_warnings(cls, saved: dict[str, Any], hparams: Any) -> list[str]:
        """lightning_dino 0.1 zeroed negative similarities; a run resumed today anchors them."""
        trained_0_1 = saved.get("gram_loss_weight", 0) > 0 and "gram_remove_negatives" not in saved
        if not trained_0_1 or hparams.get("gram_remove_negatives", True):
            return []
        return [
            "this checkpoint was trained with Gram anchoring by lightning_dino 0.1, which zeroed "
            "negative patch similarities; this run anchors them (today's default, as DINOv3's "
            f"configs); pass {setting('model', 'gram_remove_negatives', True)} to continue as "
            "it was trained"
        ]

    def schedule_warnings(self, total_steps: int, owner: object) -> list[str]:
        """A start step at or past the run's end: the run would train without the term."""
        if self.start_step < total_steps:
            return []
        return [
            f"{setting(owner, 'gram_start_step', self.start_step)} is at or past the run's last "
            f"step ({total_steps} steps): the run trains without Gram anchoring; start it earlier "
            "or train longer"
        ]

    def active(self, step: int) -> bool:
        """From ``start_step`` on."""
        return step >= self.start_step

    def snapshot_due(self, step: int) -> bool:
        """Whether the Gram teacher is taken (or refreshed) before optimizer step ``step``."""
        since = step - self.start_step
        if since == 0:
            return True
        every = self.update_every
        if every <= 0 or since < 0 or since % every:
            return False
        return self.max_updates <= 0 or since // every <= self.max_updates

    def before_batch(self, step: int, teacher: MultiCropNetwork) -> None:
        """Take a new snapshot of the EMA teacher's backbone when one is due."""
        if self.snapshot_due(step):
            self.teacher.load_state_dict(teacher.backbone.state_dict())

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """Gram loss of the student's global patch tokens against the Gram teacher's."""
        images = torch.cat(outputs.crops[: outputs.n_global])
        grid = self.teacher.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        if self.image_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        with torch.no_grad():
            anchors = token_forward(self.teacher, images)[1][:, self.teacher.num_prefix_tokens :]
            if self.image_size:
                anchors = resize_patch_grid(anchors, images.shape[-2:], self.teacher, grid)
        return self.loss(outputs.patch_tokens, anchors)


def resize_patch_grid(
    tokens: Tensor, image_size: Any, vit: nn.Module, grid: tuple[int, int]
) -> Tensor:
    """Resize a ViT's patch tokens to another patch grid (bilinear, antialiased).

    Args:
        tokens: Patch tokens (B, N, D) of images of ``image_size`` (H, W).
        image_size: The images' (H, W).
        vit: The timm ViT that made them (its patch grid for ``image_size``).
        grid: The (rows, columns) to resize to.

    Returns:
        Tokens (B, rows * columns, D).
    """
    rows, columns = vit.patch_embed.dynamic_feat_size(tuple(image_size))
    batch, _, dim = tokens.shape
    if (rows, columns) == tuple(grid):
        return tokens
    maps = tokens.transpose(1, 2).reshape(batch, dim, rows, columns)
    maps = F.interpolate(maps.float(), size=tuple(grid), mode="bilinear", antialias=True)
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)
