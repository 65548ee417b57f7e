"""DINOv3's training-time rescaling of the rotary position coordinates.

Reference: facebookresearch/dinov3 ``dinov3/layers/rope_position_encoding.py`` (``rescale_coords``,
``pos_embed_rope_rescale_coords`` in its configs: 2 for the ViT-7B and the distilled ViT-L). In
training, the patch coordinates (centred, normalised to [-1, 1] per axis) are multiplied by one
factor ``exp(u)``, ``u ~ U(-ln r, ln r)``, drawn anew for every block and every forward (every crop
size), the same for all images of the forward; in evaluation they are not. The teacher, run
without it, sees the plain coordinates.

timm's ``Eva`` (its DINOv3 ports) draws the rotary embedding once per forward and hands it to
every block; :func:`use_rope_rescale` installs hooks on the backbone that give each block its own
draw, so the backbone is called as usual (a sharded backbone still runs its own forward).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_dino.setting_names import setting


class RopeRescale:
    """The hooks of :func:`use_rope_rescale`: the patch grids seen, a draw per block.

    A block finds its grid by the number of patches of the embedding Eva hands it, so that a
    block recomputed in backward (activation checkpointing) after a forward of another crop size
    redraws for its own grid (and, its random state restored, draws the same factor).

    Args:
        backbone: A timm ``Eva`` with DINOv3's rotary embedding.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.grids: dict[int, tuple[int, int]] = {}

    def record_grid(self, module: nn.Module, args: Any, output: Tensor) -> None:
        """``patch_embed``'s forward hook: the (rows, columns) of this forward's patches."""
        if output.ndim == 4:  # (B, h, w, D), the patch embedding of a dynamic-size backbone
            grid = (int(output.shape[1]), int(output.shape[2]))
        else:
            grid = tuple(self.backbone.patch_embed.grid_size)
        self.grids[grid[0] * grid[1]] = grid

    def redraw(self, block: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """A block's forward pre-hook: in training, its own draw of the rescaled embedding."""
        rope = kwargs.get("rope")
        grid = None if rope is None else self.grids.get(int(rope.shape[-2]))
        if block.training and grid is not None:
            kwargs["rope"] = self.backbone.rope.get_embed(shape=list(grid))
        return args, kwargs


def use_rope_rescale(backbone: nn.Module, factor: float, owner: object = "model") -> nn.Module:
    """Rescale ``backbone``'s rotary coordinates in training as DINOv3 does, in place.

    Args:
        backbone: A timm ``Eva`` built with DINOv3's rotary embedding (``rope_type="dinov3"``:
            timm's ``*_dinov3`` models).
        factor: The largest factor r (> 1); each draw is log-uniform in [1/r, r].
        owner: The method, for the name of the option in messages.

    Returns:
        ``backbone``, whose blocks each draw their factor in training mode.

    Raises:
        ValueError: For a backbone without DINOv3's rotary embedding, or ``factor`` < 1.
    """
    rope = getattr(backbone, "rope", None)
    if type(rope).__name__ != "RotaryEmbeddingDinoV3" or not hasattr(backbone, "blocks"):
        raise ValueError(
            f"{setting(owner, 'rope_rescale_coords', factor)} needs a backbone with DINOv3's "
            f"rotary position embedding (timm's *_dinov3 models); "
            f"{type(backbone).__name__} has none"
        )
    if factor < 1:
        raise ValueError(f"{setting(owner, 'rope_rescale_coords', factor)}: use 0 or >= 1")
    rope.rescale_coords, rope.aug_active = float(factor), True
    hooks = RopeRescale(backbone)
    backbone.patch_embed.register_forward_hook(hooks.record_grid)
    for block in backbone.blocks:
        block.register_forward_pre_hook(hooks.redraw, with_kwargs=True)
    return backbone
