"""Feature distillation: the student regresses a frozen teacher's normalised features.

For teachers without a DINO head (every timm or hub checkpoint): the student's pooled features
and its feature map, each through a small linear projection, are pulled towards the teacher's
L2-normalised pooled features and feature map (the map resized to the student's grid). The
distance is the cosine distance ``1 - cos`` or the squared error of the normalised vectors
(``2 - 2 cos``: the same direction, twice the gradient).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision

Distance = Literal["cosine", "mse"]


def resize_map(fmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (B, C, H, W) feature map to ``size``: area average down, bilinear up.

    Args:
        fmap: The map to resize.
        size: Target (h, w).

    Returns:
        Shape (B, C, h, w); ``fmap`` itself when it already has that size.
    """
    if tuple(fmap.shape[-2:]) == tuple(size):
        return fmap
    if fmap.shape[-2] >= size[0] and fmap.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(fmap, size)
    return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)


def normalised_distance(student: Tensor, target: Tensor, distance: Distance) -> Tensor:
    """Per-row distance between L2-normalised vectors.

    Args:
        student: (N, D) predictions.
        target: (N, D) targets (no gradient needed).
        distance: ``"cosine"`` (``1 - cos``) or ``"mse"`` (``||s/|s| - t/|t|||^2``).

    Returns:
        (N,) distances.
    """
    cos = (F.normalize(student, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
    return 1.0 - cos if distance == "cosine" else 2.0 - 2.0 * cos


class FeatureDistillationLoss(nn.Module):
    """Distance between projected student features and normalised teacher features, in fp32.

    ``global_weight * mean_b d(s_b, t_b) + spatial_weight * mean_{b,p} d(S_bp, T_bp)`` where
    ``s`` / ``t`` are the student's projected and the teacher's pooled features, ``S`` / ``T``
    their feature maps (the teacher's resized to the student's grid, see :func:`resize_map`) and
    ``d`` :func:`normalised_distance`. The projections belong to the student
    (:class:`~lightning_dino.networks.distillation.FeatureStudent`); this loss has no parameters.

    Args:
        distance: ``"cosine"`` or ``"mse"``.
        global_weight: Weight of the pooled-feature term.
        spatial_weight: Weight of the feature-map term (0: pooled features only).

    Examples:
        >>> loss_fn = FeatureDistillationLoss()
        >>> loss, terms = loss_fn(torch.randn(4, 16), torch.randn(4, 16),
        ...                       torch.randn(4, 12, 2, 2), torch.randn(4, 12, 4, 4))
    """

    def __init__(
        self, distance: Distance = "cosine", global_weight: float = 1.0, spatial_weight: float = 1.0
    ) -> None:
        super().__init__()
        if distance not in ("cosine", "mse"):
            raise ValueError(f"distance must be 'cosine' or 'mse', got {distance!r}")
        self.distance = distance
        self.global_weight = global_weight
        self.spatial_weight = spatial_weight

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        student_map: Tensor | None = None,
        teacher_map: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss and its terms.

        Args:
            student: Projected student pooled features (B, D), D the teacher's width.
            teacher: Teacher pooled features (B, D) of the same images.
            student_map: Projected student feature map (B, C, h, w), or None (no spatial term).
            teacher_map: Teacher feature map (B, C, H, W), or None (no spatial term).

        Returns:
            ``(loss, {"global": ..., "spatial": ...})``; ``"spatial"`` only when computed.
        """
        with full_precision(student.device):
            pooled = normalised_distance(student.float(), teacher.float(), self.distance)
            terms = {"global": pooled.mean()}
            loss = self.global_weight * terms["global"]
            if self.spatial_weight > 0 and student_map is not None and teacher_map is not None:
                target = resize_map(teacher_map.float(), tuple(student_map.shape[-2:]))
                rows = student_map.float().flatten(2).transpose(1, 2)  # (B, h * w, C)
                targets = target.flatten(2).transpose(1, 2)
                terms["spatial"] = normalised_distance(rows, targets, self.distance).mean()
                loss = loss + self.spatial_weight * terms["spatial"]
        return loss, terms
