"""The networks of distillation: a frozen teacher, and a student with feature projections."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_dino.networks.head import DINOHead
from lightning_dino.networks.tokens import token_forward, token_problem


def pooled_and_map(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """A backbone's pooled features and its last feature map, from one call of the backbone.

    timm ViTs (``VisionTransformer``, ``Eva``): the pooled output and the patch tokens laid out
    as their (B, D, h, w) grid (:func:`~lightning_dino.networks.tokens.token_forward`). timm CNNs
    with a ``global_pool`` module (ResNet family; ``head.global_pool`` for ConvNeXt and others):
    the pooled output and the map that module pools (grid pooling included). Any other module:
    its output as the pooled features and no map.

    Args:
        backbone: A timm model without classifier, or a module mapping images to (B, D).
        images: (B, C, H, W).

    Returns:
        ``(pooled (B, D), map (B, C', h, w) or None)``.
    """
    if token_problem(backbone) is None:
        pooled, tokens = token_forward(backbone, images)
        patches = tokens[:, backbone.num_prefix_tokens :]
        height, width = _token_grid(backbone, images, patches.shape[1])
        return pooled, patches.transpose(1, 2).reshape(len(patches), -1, height, width)
    pool = _pool_module(backbone)
    if pool is None:
        return backbone(images), None
    maps: list[Tensor] = []
    handle = pool.register_forward_pre_hook(lambda module, args: maps.append(args[0]))
    try:
        pooled = backbone(images)
    finally:
        handle.remove()
    fmap = maps[-1] if maps and maps[-1].ndim == 4 else None
    return pooled, fmap


def _pool_module(backbone: nn.Module) -> nn.Module | None:
    """The module that pools a timm CNN's last map: ``global_pool`` or ``head.global_pool``."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, nn.Module):
            return pool
    return None


def _token_grid(vit: nn.Module, images: Tensor, n_patches: int) -> tuple[int, int]:
    """The (h, w) grid of a ViT's patch tokens for ``images``."""
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        height, width = images.shape[-2] // ph, images.shape[-1] // pw
        if height * width == n_patches:
            return height, width
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"cannot lay out {n_patches} patch tokens as a grid")
    return side, side


def map_channels(backbone: nn.Module, size: int | None = None) -> int | None:
    """Channels of the feature map :func:`pooled_and_map` gives, None when it gives none.

    A ViT's token width; for a CNN one forward of a blank image in eval mode.

    Args:
        backbone: A timm model or any module.
        size: Side of the blank image; None: the model's default input size (224 if unknown).

    Returns:
        C' of the (B, C', h, w) map, or None.
    """
    if token_problem(backbone) is None:
        return backbone.embed_dim
    if _pool_module(backbone) is None:
        return None
    if size is None:
        size = int((getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", [224])[-1])
    was_training = backbone.training
    try:
        with torch.no_grad():
            _, fmap = pooled_and_map(backbone.eval(), torch.zeros(1, 3, size, size))
    finally:
        backbone.train(was_training)
    return None if fmap is None else int(fmap.shape[1])


class FrozenTeacher(nn.Module):
    """A teacher that never trains: no gradients, always in eval mode, run under no_grad.

    ``train()`` keeps it in eval mode (Lightning switches the whole module to train mode when
    fitting starts), so dropout stays off and BatchNorm statistics never move.

    Args:
        backbone: The teacher's backbone (a timm model or any module giving (B, D)).
        head: Its DINO head, when it has one (a DINO checkpoint's teacher).
        patch_head: Its separate iBOT head, when it has one (else the DINO head serves the
            patch tokens).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: DINOHead | None = None,
        patch_head: DINOHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        if patch_head is not None:  # checkpoint keys teacher.patch_head.* only when there is one
            self.patch_head = patch_head
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever ``mode`` is asked for."""
        return super().train(False)

    @torch.no_grad()
    def features(self, images: Tensor, size: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Pooled features and feature map of ``images`` (see :func:`pooled_and_map`).

        Args:
            images: (B, C, H, W), all global crops of a step in one batch.
            size: Resize the images to ``size x size`` first (bilinear, antialiased), for a
                teacher that works at a larger resolution than the student's crops.

        Returns:
            ``(pooled (B, D), map (B, C', h, w) or None)``.
        """
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return pooled_and_map(self.backbone, images)


class FeatureStudent(nn.Module):
    """A student backbone with linear projections to the teacher's widths.

    Args:
        backbone: The student backbone.
        in_dim: Width of its pooled features.
        out_dim: Width of the teacher's pooled features.
        map_in_dim: Channels of its feature map (None: no spatial projection).
        map_out_dim: Channels of the teacher's feature map (None: no spatial projection).
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_dim: int,
        out_dim: int,
        map_in_dim: int | None = None,
        map_out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(in_dim, out_dim)
        self.map_projection = None
        if map_in_dim and map_out_dim:
            self.map_projection = nn.Linear(map_in_dim, map_out_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Projected pooled features (B, out_dim) and projected map (B, map_out_dim, h, w)."""
        pooled, fmap = pooled_and_map(self.backbone, images)
        projected_map = None
        if self.map_projection is not None and fmap is not None:
            projected_map = self.map_projection(fmap.movedim(1, -1)).movedim(-1, 1)
        return self.projection(pooled), projected_map
