"""Self-attention maps of a ViT's CLS token (Caron et al. 2021, §4.2.2, Figs. 1, 3 and 4).

Reference: facebookresearch/dino ``visualize_attention.py``. The map of a head is the last block's
attention probability from the CLS query to every patch key, on the patch grid. For the one
forward that reads them, the last block's attention runs its explicit (not fused) path, and a
temporary hook on its ``attn_drop`` (called with the softmax probabilities) keeps them: the
model's own computation, rotary positions included (timm ``Eva``, as DINOv3), for timm's
``VisionTransformer`` and ``Eva`` alike. The outputs are untouched and nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import Eva, VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from lightning_dino.eval.knn import evaluated_backbone
from lightning_dino.extras import require
from lightning_dino.networks.sharding import is_sharded

_PURPOSE = "Attention images (AttentionMapMonitor, lightning-dino attention)"


def check_vit(backbone: nn.Module) -> nn.Module:
    """Return ``backbone`` if its CLS attention can be read, else raise a clear error.

    Args:
        backbone: Candidate backbone.

    Returns:
        The same module: a timm ``VisionTransformer`` or ``Eva``.

    Raises:
        TypeError: ``backbone`` is not a timm ``VisionTransformer`` or ``Eva`` whose last block's
            attention has an ``attn_drop`` module and a ``fused_attn`` switch (timm's attention).
        ValueError: The ViT has no class token.
    """
    if not isinstance(backbone, VisionTransformer | Eva):
        raise TypeError(
            "not a ViT: attention maps need a timm VisionTransformer or Eva "
            f"(got {type(backbone).__name__})"
        )
    attn = backbone.blocks[-1].attn
    readable = isinstance(getattr(attn, "attn_drop", None), nn.Module)
    if not (readable and hasattr(attn, "fused_attn")):
        raise TypeError(
            "attention maps need a last block whose attention is timm's (an attn_drop module "
            f"and a fused_attn switch); got {type(attn).__name__}"
        )
    if backbone.cls_token is None:
        raise ValueError(
            "attention maps need a class token; this ViT was built with class_token=False"
        )
    return backbone


def attention_maps(vit: nn.Module, images: Tensor, threshold: float | None = None) -> Tensor:
    """CLS-to-patch attention of the last block, one map per head, on the patch grid.

    The softmax of the model runs over all keys, CLS and registers included; here each head's
    row is restricted to the patch keys and renormalised, so without ``threshold`` every map sums
    to 1 over the patches. With ``threshold`` (e.g. 0.6, the paper's Fig. 4), each head's map is
    replaced by a 0/1 mask of the smallest set of patches holding at least that fraction of the
    renormalised mass (see :func:`attention_mass_mask`).

    The model runs in eval mode under ``torch.inference_mode``; its mode is restored afterwards.

    Args:
        vit: A timm ``VisionTransformer`` or ``Eva`` with a class token (any
            ``num_prefix_tokens``).
        images: Normalised images, shape (B, 3, H, W); H and W must suit the ViT (any multiple of
            the patch size when it was built with ``dynamic_img_size=True``).
        threshold: Fraction of mass to keep in (0, 1], or None for the raw maps.

    Returns:
        float32 tensor of shape (B, heads, H // patch, W // patch): probabilities, or 0/1 masks
        when ``threshold`` is given.

    Raises:
        TypeError: ``vit`` is not a timm VisionTransformer or Eva (see :func:`check_vit`).

    Examples:
        >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        >>> attention_maps(vit, torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 3, 14, 14])
    """
    vit = check_vit(vit)
    attn_module = vit.blocks[-1].attn
    captured: list[Tensor] = []

    def capture(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0][:, :, 0].float())  # the CLS query's row, (B, heads, N)

    was_training, was_fused = vit.training, attn_module.fused_attn
    handle = attn_module.attn_drop.register_forward_pre_hook(capture)
    try:
        vit.eval()
        attn_module.fused_attn = False
        with torch.inference_mode():
            vit(images)
    finally:
        handle.remove()
        attn_module.fused_attn = was_fused
        vit.train(was_training)
    patches = captured[0][:, :, vit.num_prefix_tokens :]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    grid_h, grid_w = vit.patch_embed.dynamic_feat_size(images.shape[-2:])
    maps = patches.reshape(*patches.shape[:2], grid_h, grid_w)
    return maps if threshold is None else attention_mass_mask(maps, threshold)


def attention_mass_mask(maps: Tensor, threshold: float) -> Tensor:
    """Per map, mark the smallest set of cells holding at least ``threshold`` of its mass.

    This is DINO's thresholding (``visualize_attention.py --threshold``): cells are taken in
    decreasing order of attention until their cumulative mass reaches ``threshold``; ties are
    broken arbitrarily.

    Args:
        maps: Non-negative maps summing to 1 over their last two dims, shape (..., h, w).
        threshold: Mass to keep, in (0, 1].

    Returns:
        0/1 float mask of the same shape.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of attention mass in (0, 1], got {threshold}")
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    mass_before = values.cumsum(dim=-1) - values
    keep_sorted = (mass_before < threshold).float()
    return torch.zeros_like(flat).scatter_(-1, order, keep_sorted).reshape(maps.shape)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo per-channel normalisation and clamp to [0, 1].

    Args:
        images: Normalised images, shape (..., 3, H, W).
        mean: Per-channel mean used for normalisation.
        std: Per-channel std used for normalisation.

    Returns:
        Images in [0, 1], same shape.
    """
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of maps (..., h, w) to (..., *size)."""
    return F.interpolate(maps.float().flatten(0, -3)[:, None], size=size, mode="nearest")[
        :, 0
    ].reshape(*maps.shape[:-2], *size)


def _colorize(maps: Tensor, cmap: str = "inferno") -> Tensor:
    """Map each (h, w) map in (n, h, w), scaled by its own maximum, to RGB (n, 3, h, w)."""
    scaled = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    rgba = require("matplotlib", _PURPOSE).colormaps[cmap](scaled.cpu().numpy())
    return torch.from_numpy(rgba[..., :3]).permute(0, 3, 1, 2).float()


def attention_grid(
    images: Tensor,
    maps: Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Tensor:
    """Tile images and their attention maps into one RGB image for TensorBoard.

    Each row is one image: the de-normalised image, the head-mean map, then one map per head,
    each upsampled (nearest) to the image size and coloured (per-panel scaling).

    Args:
        images: Normalised images, shape (B, 3, H, W).
        maps: Their maps from :func:`attention_maps`, shape (B, heads, h, w).
        mean: Normalisation mean.
        std: Normalisation std.

    Returns:
        Grid image in [0, 1], shape (3, H', W'), on CPU.
    """
    size = (images.shape[-2], images.shape[-1])
    panels = []
    for image, image_maps in zip(images.cpu(), maps.cpu(), strict=True):
        per_head = _upsample(torch.cat([image_maps.mean(dim=0, keepdim=True), image_maps]), size)
        panels += [denormalize(image.float(), mean, std)[None], _colorize(per_head)]
    return make_grid(torch.cat(panels), nrow=maps.shape[1] + 2, padding=2, pad_value=1.0)


def save_attention_png(
    image: Tensor,
    maps: Tensor,
    path: str | Path,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Path:
    """Write a PNG with the image, one panel per head, and the head-mean map.

    Uses a standalone matplotlib ``Figure`` (Agg canvas), so no pyplot state or backend switch.

    Args:
        image: One normalised image, shape (3, H, W).
        maps: Its maps, shape (heads, h, w), upsampled (nearest) to (H, W) for display.
        path: Output file; parent directories are created.
        mean: Normalisation mean.
        std: Normalisation std.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (image.shape[-2], image.shape[-1])
    upsampled = _upsample(maps.detach().cpu(), size)
    panels = [
        ("image", denormalize(image.detach().cpu().float(), mean, std).permute(1, 2, 0)),
        *((f"head {i}", head) for i, head in enumerate(upsampled)),
        ("mean", upsampled.mean(dim=0)),
    ]
    fig = require("matplotlib.figure", _PURPOSE).Figure(figsize=(2.2 * len(panels), 2.4))
    for axis, (title, panel) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        axis.imshow(panel.numpy(), cmap="inferno", interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


class AttentionMapMonitor(Callback):
    """Log the evaluated backbone's CLS attention maps on a fixed set of images to TensorBoard.

    The images are fixed once: the first ``n_images`` of ``trainer.datamodule.knn_val_dataloader()``
    when the data module has labels, otherwise the first global crop of the first training batch
    (``batch[0][0]``, descending into nested lists/tuples until a tensor is found). Every
    ``every_n_epochs`` epochs, rank zero computes :func:`attention_maps` of the
    :func:`~lightning_dino.eval.knn.evaluated_backbone` (DINO's teacher, a distillation's student
    EMA) and logs :func:`attention_grid` as ``attention/maps`` with
    ``logger.experiment.add_image`` on the first ``TensorBoardLogger``. A non-ViT backbone gets one
    warning and disables the callback.

    Args:
        every_n_epochs: Log after every n-th training epoch.
        n_images: Number of fixed images.
        threshold: Optional mass fraction for 0/1 masks (e.g. 0.6); raw maps when None.
        mean: Normalisation mean of the images, for display.
        std: Normalisation std of the images, for display.

    Attributes:
        last_grid: The latest logged grid, shape (3, H', W'), or None.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[AttentionMapMonitor(every_n_epochs=10, n_images=8)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_images: int = 4,
        threshold: float | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if every_n_epochs < 1 or n_images < 1:
            raise ValueError(
                "AttentionMapMonitor needs every_n_epochs >= 1 and n_images >= 1, got "
                f"{every_n_epochs} and {n_images}"
            )
        require("matplotlib", _PURPOSE)  # before training starts, not at the first image
        self.every_n_epochs = every_n_epochs
        self.n_images = n_images
        self.threshold = threshold
        self.mean, self.std = tuple(mean), tuple(std)
        self.last_grid: Tensor | None = None
        self._images: Tensor | None = None
        self._disabled = False
        self._no_logger_reported = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the backbone is a ViT and, with labels, fix the images from the k-NN val split."""
        try:
            check_vit(evaluated_backbone(pl_module))
        except (TypeError, ValueError) as error:
            rank_zero_warn(f"AttentionMapMonitor is disabled: {error}")
            self._disabled = True
            return
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "has_labels", False):
            self._images = _first_images(datamodule.knn_val_dataloader(), self.n_images)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Without labelled images, fix the first global crop of the first batch."""
        if self._images is not None or self._disabled:
            return
        crops = _first_tensor(batch)
        if crops is None or crops.ndim != 4:
            rank_zero_warn(
                "AttentionMapMonitor is disabled: no (B, 3, H, W) image tensor at batch[0][0] of a "
                f"{type(batch).__name__} training batch and no labelled k-NN split to draw from"
            )
            self._disabled = True
            return
        self._images = crops[: self.n_images].detach().cpu().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every n-th epoch, compute the maps on rank zero (every rank when sharded), log the grid.

        A sharded backbone gathers its weights in every forward, a collective call: every rank
        runs it on its own images, and rank zero logs its grid.
        """
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        backbone = evaluated_backbone(pl_module)
        if self._disabled or not due or self._images is None:
            return
        if not trainer.is_global_zero and not is_sharded(backbone):
            return
        images = self._images.to(pl_module.device)
        maps = attention_maps(backbone, images, self.threshold)
        if not trainer.is_global_zero:
            return
        self.last_grid = attention_grid(self._images, maps, self.mean, self.std)
        tensorboard = next(
            (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if tensorboard is None:
            if not self._no_logger_reported:
                rank_zero_info(
                    "AttentionMapMonitor: no TensorBoardLogger; maps kept in `last_grid`."
                )
            self._no_logger_reported = True
            return
        tensorboard.experiment.add_image("attention/maps", self.last_grid, trainer.global_step)


def _first_images(loader: Any, n_images: int) -> Tensor:
    """The first ``n_images`` images (n, 3, H, W) of a loader of ``(images, labels)``."""
    images: list[Tensor] = []
    for batch_images, _ in loader:
        images.append(batch_images)
        if sum(len(chunk) for chunk in images) >= n_images:
            break
    return torch.cat(images)[:n_images].clone()


def _first_tensor(batch: Any) -> Tensor | None:
    """Descend into element 0 of nested lists/tuples; the tensor found there, or None."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return batch if isinstance(batch, Tensor) else None
