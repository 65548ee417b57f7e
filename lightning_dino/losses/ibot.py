"""The iBOT masked-patch loss (DINOv2's patch-level term) and its teacher targets.

Reference: Zhou et al., *iBOT: Image BERT Pre-Training with Online Tokenizer*, ICLR 2022;
Oquab et al., *DINOv2*, TMLR 2024; ``iBOTPatchLoss`` of facebookresearch/dinov2
``dinov2/loss/ibot_patch_loss.py`` (``forward_masked``, ``softmax_center_teacher``,
``update_center``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.center import EMACenter
from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.sinkhorn_knopp import sinkhorn_knopp
from lightning_dino.losses.term import Check, LossTerm
from lightning_dino.networks.backbones import MultiCropNetwork
from lightning_dino.networks.forward import MASKS, TOKENS, StepOutputs
from lightning_dino.networks.head import head_arguments
from lightning_dino.networks.masking import batch_masks
from lightning_dino.networks.tokens import check_token_backbone
from lightning_dino.setting_names import setting


class iBOTPatchLoss(EMACenter):
    """Cross-entropy between teacher and student patch distributions at masked patches.

    The student sees a global crop with some patch tokens replaced by a mask token; the teacher
    sees the whole crop. For every masked patch the loss is ``-sum_k p_t log softmax(s / tau_s)``;
    each image's masked patches are averaged, the images summed and divided by the batch size
    (every image counts equally, masked or not, as in DINOv2). Everything runs in fp32.

    The teacher targets come from :meth:`teacher_probs` (centred with this loss's own EMA centre,
    sharpened by the teacher temperature) or from
    :func:`~lightning_dino.losses.sinkhorn_knopp.sinkhorn_knopp`.

    Args:
        out_dim: Number of prototypes K of the patch head.
        student_temp: Student temperature (0.1).
        center_momentum: EMA momentum of the patch centre (0.9).

    Attributes:
        center: Buffer (1, K): EMA of the raw teacher patch logits; ``accumulate_center`` the
            logits of the patches used, ``update_center()`` once per optimizer step.

    Examples:
        >>> loss_fn = iBOTPatchLoss(out_dim=16)
        >>> masks = torch.zeros(2, 4, dtype=torch.bool)
        >>> masks[0, :2] = True
        >>> targets = loss_fn.teacher_probs(torch.randn(2, 16), teacher_temp=0.07)
        >>> loss = loss_fn(torch.randn(2, 16), targets, masks)
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        if out_dim < 2 or student_temp <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(
                "iBOTPatchLoss needs out_dim >= 2, student_temp > 0 and center_momentum in "
                f"[0, 1]; got {out_dim}, {student_temp}, {center_momentum}"
            )
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.init_center(out_dim)

    def forward(
        self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor
    ) -> Tensor:
        """The loss over the masked patches of a batch.

        Args:
            student_patch_logits: Student head outputs at the masked positions (M, K), in the
                order of ``masks.nonzero()`` (image-major).
            teacher_patch_probs: Teacher probabilities at the same positions (M, K).
            masks: Boolean (B, N): which of each image's N patches were masked; M = masks.sum().

        Returns:
            Scalar fp32 loss.
        """
        masks = masks.bool()
        n_masked = int(masks.sum())
        if student_patch_logits.shape != teacher_patch_probs.shape or (
            student_patch_logits.shape[0] != n_masked
        ):
            raise ValueError(
                "expected student logits and teacher probabilities of shape (M, K) with M = "
                f"masks.sum() = {n_masked}; got {tuple(student_patch_logits.shape)} and "
                f"{tuple(teacher_patch_probs.shape)}"
            )
        with full_precision(student_patch_logits.device):
            log_p = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
            per_patch = (teacher_patch_probs.float() * log_p).sum(dim=-1)  # (M,)
            per_image = masks.sum(dim=-1).clamp(min=1).float()  # (B,)
            weights = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
            return -(per_patch * weights).sum() / masks.shape[0]

    @torch.no_grad()
    def teacher_probs(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        """Centred, sharpened teacher targets: ``softmax((t - center) / teacher_temp)``.

        Args:
            teacher_patch_logits: Raw teacher patch logits (..., K).
            teacher_temp: Teacher temperature.

        Returns:
            fp32 probabilities of the same shape.
        """
        with full_precision(teacher_patch_logits.device):
            centred = teacher_patch_logits.float() - self.center.float()
            return F.softmax(centred / teacher_temp, dim=-1)


class iBOTTerm(LossTerm):
    """DINOv2's iBOT term of :class:`~lightning_dino.DINO`: masked-patch cross-entropy.

    The student's global crops are masked block-wise (:func:`batch_masks`); the teacher sees them
    whole. The teacher's patch logits at the masked positions become targets with this term's
    own EMA centre (moved once per optimizer step over the global batch) or by Sinkhorn-Knopp.

    Arguments of :class:`~lightning_dino.DINO` (``--model.*``):

    - ``ibot_loss_weight``: the weight (0 = off; 1.0 in DINOv2). Needs a timm ViT whose features
      are its tokens (``feature_grid`` 0); both networks get a learned mask token.
    - ``ibot_mask_ratio``: (min, max) fraction of the patches masked in a masked image.
    - ``ibot_mask_probability``: fraction of the global crops that are masked.
    - ``ibot_mask_rule``: ``"dinov2"`` (each masked image draws its ratio in its sub-interval
      of ``ibot_mask_ratio``; a mask may end short) or ``"dinov3"`` (the sub-interval's upper
      edge, the count made exact; see :func:`~lightning_dino.networks.masking.batch_masks`).
    - ``ibot_separate_head``: a separate head for the patch tokens (DINOv2's ViT-L/g recipes);
      False projects them with the DINO head.
    - ``ibot_out_dim``, ``ibot_bottleneck_dim``: prototypes and bottleneck of the separate head
      (0: the DINO head's ``out_dim`` and ``bottleneck_dim``).

    The temperature and centring are the DINO loss's (``student_temp``, ``center_momentum``,
    ``centering``).

    Args:
        weight: The term's weight (1.0 in DINOv2).
        out_dim: Number of prototypes K of the head.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the patch centre.
        centering: ``"center"`` or ``"sinkhorn_knopp"``, as the DINO loss's.
        mask_ratio: (min, max) fraction of the patches masked in a masked image.
        mask_probability: Fraction of the global crops that are masked.
        mask_rule: ``"dinov2"`` or ``"dinov3"`` (see :func:`batch_masks`).
    """

    name = "ibot"
    needs = frozenset({MASKS, TOKENS})

    def __init__(
        self,
        weight: float,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        mask_rule: str = "dinov2",
    ) -> None:
        super().__init__(weight)
        self.loss = iBOTPatchLoss(out_dim, student_temp, center_momentum)
        self.centering = centering
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mask_probability = mask_probability
        self.mask_rule = mask_rule

    @staticmethod
    def patch_head_dims(hparams: Any) -> tuple[int, int]:
        """(prototypes, bottleneck) of the head that projects the patch tokens."""
        if not hparams.ibot_separate_head:
            return hparams.out_dim, hparams.bottleneck_dim
        return (hparams.ibot_out_dim or hparams.out_dim,
                hparams.ibot_bottleneck_dim or hparams.bottleneck_dim)

    @classmethod
    def argument_checks(cls, hparams: Any) -> list[Check]:
        """The weight, the masking, and the separate head's sizes."""
        return [
            *super().argument_checks(hparams),
            *cls.mask_checks(hparams),
            (hparams.ibot_out_dim == 0 or hparams.ibot_out_dim >= 2, "ibot_out_dim",
             "use 0 or >= 2"),
            (hparams.ibot_bottleneck_dim >= 0, "ibot_bottleneck_dim", "use 0 or a width"),
        ]

    @staticmethod
    def mask_checks(hparams: Any) -> list[Check]:
        """The checks of ``ibot_mask_ratio``, ``ibot_mask_probability`` and ``ibot_mask_rule``."""
        low, high = hparams.ibot_mask_ratio
        return [
            (0 < low <= high < 1, "ibot_mask_ratio", "use 0 < min <= max < 1 ([0.1, 0.5])"),
            (0 <= hparams.ibot_mask_probability <= 1, "ibot_mask_probability", "use [0, 1] (0.5)"),
            (hparams.get("ibot_mask_rule", "dinov2") in ("dinov2", "dinov3"), "ibot_mask_rule",
             "use dinov2 or dinov3"),
        ]

    @classmethod
    def network_options(cls, hparams: Any) -> dict[str, Any]:
        """A learned mask token, and the separate patch head with ``ibot_separate_head``."""
        if not hparams.ibot_separate_head:
            return {"mask_token": True}
        out_dim, bottleneck_dim = cls.patch_head_dims(hparams)
        patch_head = {**head_arguments(hparams), "out_dim": out_dim,
                      "bottleneck_dim": bottleneck_dim}
        return {"mask_token": True, "patch_head_kwargs": patch_head}

    @classmethod
    def check_backbone(cls, backbone: nn.Module, feature_dim: int, owner: object) -> None:
        """A timm ViT whose pooled features are its tokens, so one head takes both."""
        check_token_backbone(backbone, owner, cls.weight_key())
        if feature_dim != backbone.embed_dim:
            raise ValueError(
                f"{setting(owner, 'ibot_loss_weight')} needs a ViT whose features are its "
                f"{backbone.embed_dim}-wide tokens (class token or average pooling, "
                f"{setting(owner, 'feature_grid', 0)}), so that one head takes class and patch "
                f"tokens; this backbone's features are {feature_dim}-wide"
            )

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> iBOTTerm:
        """The term with the DINO loss's temperature and centring."""
        return cls(
            hparams.ibot_loss_weight,
            cls.patch_head_dims(hparams)[0],
            hparams.student_temp,
            hparams.center_momentum,
            hparams.centering,
            tuple(hparams.ibot_mask_ratio),
            hparams.ibot_mask_probability,
            hparams.get("ibot_mask_rule", "dinov2"),
        )

    def draw_masks(self, n_images: int, rows: int, columns: int) -> Tensor:
        """Block-wise masks for the global crops, (n_images, rows * columns)."""
        return batch_masks(
            n_images, rows, columns, self.mask_ratio, self.mask_probability, self.mask_rule
        )

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """The masked-patch loss; accumulates the teacher's patch logits for the centre."""
        teacher_patches = outputs.teacher_patch_logits
        if self.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp(teacher_patches, teacher_temp)
        else:
            targets = self.loss.teacher_probs(teacher_patches, teacher_temp)
            self.loss.accumulate_center(teacher_patches)  # applied in before_optimizer_step
        return self.loss(outputs.student_patch_logits, targets, outputs.masks)

    def start_run(self) -> None:
        """Reset the patch centre to 0."""
        self.loss.reset_center()

    def before_optimizer_step(self) -> None:
        """Move the patch centre by this step's accumulated teacher statistics."""
        self.loss.update_center()
