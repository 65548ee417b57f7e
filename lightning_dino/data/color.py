"""Colour operations on float images in [0, 1], one factor per image, as torchvision computes them.

Used on whole batches by :class:`~lightning_dino.data.batched.BatchedMultiCropTransform`, and
for the hue step of the per-sample :class:`~lightning_dino.data.MultiCropTransform`
(:class:`FastColorJitter`), where torchvision's HSV round trip is the costliest operation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def grayscale(images: Tensor) -> Tensor:
    """Luma of RGB images (n, 3, H, W) as (n, 1, H, W); single-channel images pass through.

    One matrix-vector product over the channels (a single pass over the pixels).
    """
    if images.shape[1] == 1:
        return images
    n, _, height, width = images.shape
    luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
    return torch.matmul(luma, images.reshape(n, 3, -1)).view(n, 1, height, width)


def _blend_(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``other + factor * (images - other)``, clamped to [0, 1], written into ``images``.

    Equals torchvision's ``factor * images + (1 - factor) * other`` to float rounding.
    """
    return images.sub_(other).mul_(factor.view(-1, 1, 1, 1)).add_(other).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image brightness, in place: ``images * factor`` clamped to [0, 1].

    Args:
        images: float (n, C, H, W) in [0, 1]; overwritten with the result.
        factor: float (n,) brightness factors.

    Returns:
        ``images``.
    """
    return images.mul_(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image contrast, in place: blend with the mean grey level of each image.

    Args:
        images: float (n, C, H, W) in [0, 1]; overwritten with the result.
        factor: float (n,) contrast factors.

    Returns:
        ``images``.
    """
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend_(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image saturation, in place: blend with the grayscale image (no-op on grey images).

    Args:
        images: float (n, C, H, W) in [0, 1]; overwritten with the result.
        factor: float (n,) saturation factors.

    Returns:
        ``images``.
    """
    if images.shape[1] == 1:
        return images
    return _blend_(images, grayscale(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Per-image hue shift by ``factor`` (fraction of the hue circle) in HSV space.

    Same algorithm as torchvision's ``adjust_hue`` (PIL's HSV conversion); grey images pass
    through.

    Args:
        images: float (n, C, H, W) in [0, 1].
        factor: float (n,) shifts in [-0.5, 0.5].

    Returns:
        float (n, C, H, W).
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    spread = maxc - minc
    # Hue in sixths of the circle, as torchvision's _rgb2hsv computes it (ties: r, then g).
    max_is_r, max_is_g = maxc == r, maxc == g
    numerator = torch.where(max_is_r, g - b, torch.where(max_is_g, b - r, r - g))
    offset = torch.where(max_is_r, 0.0, torch.where(max_is_g, 2.0, 4.0))
    sector = numerator.div_(torch.where(spread == 0, 1.0, spread)).add_(offset)
    sector = sector.add_(6.0 * factor.view(-1, 1, 1) + 6.0).remainder_(6.0)
    return _hsv_to_rgb(sector, spread, maxc)


def _hsv_to_rgb(sector: Tensor, spread: Tensor, value: Tensor) -> Tensor:
    """HSV planes (n, H, W) to RGB (n, 3, H, W), the values of torchvision's ``_hsv_to_rgb``.

    Uses the closed form ``channel = v - (v - min) * clamp(d - 1, 0, 1)``, d the circular
    distance (in sixths of the hue circle) between the hue and the channel's own hue (0, 2, 4
    for R, G, B), which equals torchvision's table of ``(v, p, q, t)`` per hue sector
    (``v - min = v * s``) without building index tensors.

    Args:
        sector: Hue times 6, in [0, 6).
        spread: ``v * s``: the value minus the smallest channel.
        value: The largest channel, v.
    """
    out = torch.empty(
        (value.shape[0], 3, *value.shape[1:]), dtype=value.dtype, device=value.device
    )
    for channel, centre in enumerate((0.0, 2.0, 4.0)):
        distance = (sector - centre).abs_().sub_(1.0)  # d - 1 before folding d to 6 - d
        weight = torch.minimum(distance, 4.0 - distance).clamp_(0.0, 1.0)
        torch.addcmul(value, spread, weight, value=-1.0, out=out[:, channel])
    return out


class FastColorJitter(v2.ColorJitter):
    """``torchvision.transforms.v2.ColorJitter`` with a faster hue step for tensor images.

    Same parameters, random draws (order and factors) and brightness / contrast / saturation
    kernels as torchvision; the hue shift uses :func:`adjust_hue` (the same HSV algorithm in a
    closed form, without index tensors) between the same dtype conversions torchvision makes.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the four adjustments in this call's random order."""
        if not isinstance(inpt, Tensor) or params["hue_factor"] is None or inpt.shape[-3] == 1:
            return super().transform(inpt, params)
        output = inpt
        for fn_id in params["fn_idx"].tolist():
            if fn_id == 3:
                output = _hue(output, params["hue_factor"])
            else:
                output = super().transform(output, {**params, "fn_idx": torch.tensor([fn_id])})
        return output


def _hue(image: Tensor, factor: float) -> Tensor:
    """Torchvision's ``adjust_hue`` on a (3, H, W) tensor, with the closed-form HSV round trip."""
    pixels = TF.to_dtype(image, torch.float32, scale=True)
    shifted = adjust_hue(pixels.unsqueeze(0), torch.tensor([factor]))[0]
    return TF.to_dtype(shifted, image.dtype, scale=True)
