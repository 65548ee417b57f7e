"""One training step's forward of the student and the teacher, shaped by what the loss terms need.

The plain DINO step runs the teacher on the global crops and the student on every crop, one
backbone call per resolution. Loss terms that read patch tokens (iBOT, Gram anchoring) need the
token-wise forward of the global crops instead, and iBOT masks the student's input there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dino.networks.backbones import MultiCropNetwork

# What a loss term may ask of the forward (see lightning_dino.losses.term.LossTerm.needs).
FEATURES = "features"  # student backbone features of every crop
TOKENS = "tokens"  # the token-wise forward of the global crops (student patch tokens)
MASKS = "masks"  # iBOT masking of the student's global crops (implies TOKENS)
GRAM_CROPS = "gram_crops"  # the data module's crops for the Gram teacher, when it makes them

# (n_images, patch rows, patch columns) -> boolean (n_images, rows * columns) masks.
MaskDrawer = Callable[[int, int, int], Tensor]


@dataclass
class StepOutputs:
    """What the networks produced for one batch; each loss term reads the fields it needs.

    Attributes:
        crops: The batch's crops, crop-major ``[g1, g2, l1..lN]``, each (B, C, H, W).
        n_global: How many leading crops are global (teacher) views.
        student_out: Student head logits of every crop, (n_crops, B, K).
        teacher_out: Teacher head logits of the global crops, (n_global, B, K).
        features: Student backbone features of every crop, (n_crops, B, D), when asked for
            (:data:`FEATURES`) or computed anyway by the token-wise forward; else None.
        masks: Boolean patch masks of the global crops, (n_global * B, N), crop-major, in the
            token-wise forward (all False without :data:`MASKS`); else None.
        student_patch_logits: Student head logits at the masked patches, (M, K) with
            M = ``masks.sum()``, in ``masks.nonzero()`` order; None outside the token-wise forward.
        teacher_patch_logits: Teacher head logits at the same patches of the unmasked crops,
            (M, K); None outside the token-wise forward.
        patch_tokens: Student patch tokens of the global crops, (n_global * B, N, D); None
            outside the token-wise forward.
        extra_crops: Crops the batch holds besides the student's, by name (``"gram"``: the
            Gram teacher's crops of the global boxes, n_global of (B, C, H', W')).
    """

    crops: list[Tensor]
    n_global: int
    student_out: Tensor
    teacher_out: Tensor
    features: Tensor | None = None
    masks: Tensor | None = None
    student_patch_logits: Tensor | None = None
    teacher_patch_logits: Tensor | None = None
    patch_tokens: Tensor | None = None
    extra_crops: dict[str, list[Tensor]] = field(default_factory=dict)


def forward_step(
    student: MultiCropNetwork,
    teacher: MultiCropNetwork,
    crops: list[Tensor],
    n_global: int,
    needs: set[str] | frozenset[str] = frozenset(),
    draw_masks: MaskDrawer | None = None,
    extra_crops: dict[str, list[Tensor]] | None = None,
) -> StepOutputs:
    """Run the teacher (no grad) on the global crops and the student on every crop.

    Args:
        student: The trained network.
        teacher: The EMA teacher (run under ``torch.no_grad``).
        crops: Crop-major list of (B, C, H, W) tensors; the first ``n_global`` are global.
        n_global: Number of global crops.
        needs: What the active loss terms need (:data:`FEATURES`, :data:`TOKENS`,
            :data:`MASKS`); the plain DINO forward when empty.
        draw_masks: Draws the student's patch masks for :data:`MASKS` (the masks are drawn
            before either network runs).
        extra_crops: The batch's other crops by name (``"gram"``), handed to the terms.

    Returns:
        The step's :class:`StepOutputs`.
    """
    if MASKS in needs or TOKENS in needs:
        drawer = draw_masks if MASKS in needs else None
        outputs = _token_forward(student, teacher, crops, n_global, drawer)
    else:
        with torch.no_grad():
            teacher_out = teacher(crops[:n_global])
        if FEATURES in needs:
            student_out, features = student.forward_with_features(crops)
            outputs = StepOutputs(crops, n_global, student_out, teacher_out, features=features)
        else:
            outputs = StepOutputs(crops, n_global, student(crops), teacher_out)
    outputs.extra_crops = dict(extra_crops or {})
    return outputs


def _token_forward(
    student: MultiCropNetwork,
    teacher: MultiCropNetwork,
    crops: list[Tensor],
    n_global: int,
    draw_masks: MaskDrawer | None,
) -> StepOutputs:
    """Both networks token-wise on the global crops, the student's masked when ``draw_masks``."""
    batch, _, height, width = crops[0].shape
    rows, columns = student.backbone.patch_embed.dynamic_feat_size((height, width))
    if draw_masks is not None:
        masks = draw_masks(n_global * batch, rows, columns)
    else:
        masks = torch.zeros(n_global * batch, rows * columns, dtype=torch.bool)
    masks = masks.to(crops[0].device)
    with torch.no_grad():
        teacher_out, teacher_patch_logits, _, _ = teacher.forward_masked(
            crops[:n_global], n_global, masks, mask_input=False
        )
    student_out, student_patch_logits, features, patch_tokens = student.forward_masked(
        crops, n_global, masks, mask_input=draw_masks is not None
    )
    return StepOutputs(
        crops,
        n_global,
        student_out,
        teacher_out,
        features=features,
        masks=masks,
        student_patch_logits=student_patch_logits,
        teacher_patch_logits=teacher_patch_logits,
        patch_tokens=patch_tokens,
    )
