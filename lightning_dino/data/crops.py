"""The multi-crop settings: one type with the reference's defaults and the checks of every value.

:class:`CropSettings` is what the per-sample (:class:`~lightning_dino.data.MultiCropTransform`),
batched and on-device (:class:`~lightning_dino.data.batched.BatchedMultiCropTransform`) pipelines
and :class:`~lightning_dino.data.MultiCropDataModule` take: the defaults and the checks are
written here once. The data module keeps each setting as a flat argument
(``--data.global_crop_size``) whose default is read from here.

Defaults: ``DataAugmentationDINO`` of facebookresearch/dino ``main_dino.py`` (two 224-px global
crops of 40-100 % of the image, eight 96-px local crops of 5-40 %, the flip, colour jitter,
grayscale, blur and solarisation probabilities of the paper).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# RandomResizedCrop's aspect-ratio range and number of attempts (torchvision's defaults).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class CropSettings:
    """How each image becomes its global and local views.

    Global view 1 is blurred with ``blur_p[0]``; global views 2+ with ``blur_p[1]`` and solarised
    with ``solarize_p``; local views blurred with ``blur_p[2]``; every view gets its own crop,
    flip, colour jitter and grayscale draw.

    Args:
        global_crop_size: Output side of global crops, in pixels.
        local_crop_size: Output side of local crops, in pixels.
        n_local_crops: Number of local crops (0 disables multi-crop).
        global_crop_scale: (min, max) fraction of the image area a global crop covers.
        local_crop_scale: (min, max) fraction of the image area a local crop covers.
        n_global_crops: Number of global crops.
        hflip_p: Probability of a horizontal flip.
        color_jitter: (brightness, contrast, saturation, hue) strengths.
        color_jitter_p: Probability of applying the colour jitter.
        grayscale_p: Probability of converting a view to grayscale.
        blur_p: Blur probability for (global view 1, other global views, local views).
        blur_sigma: (min, max) of the uniformly sampled blur sigma, in pixels of the crop.
        solarize_p: Probability of solarising global views 2+.
        mean: Per-channel normalisation mean, for images in [0, 1].
        std: Per-channel normalisation std, for images in [0, 1].
        gram_crop_size: 0 (off), or the side of the Gram teacher's crops: for each global crop,
            the same box (and flip) resampled at this size, without colour or blur, normalised
            (DINOv3's ``gram_teacher_crops_size`` with ``gram_teacher_no_distortions``; 512 for
            256-px global crops). For a DINO run with Gram anchoring.

    Raises:
        ValueError: If a value is out of range; the message starts with its name.

    Examples:
        >>> CropSettings(global_crop_size=32, local_crop_size=16).n_crops
        10
    """

    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 8
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    n_global_crops: int = 2
    hflip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    gram_crop_size: int = 0

    def __post_init__(self) -> None:
        for name in ("global_crop_scale", "local_crop_scale", "color_jitter", "blur_p",
                     "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        _check_min("global_crop_size", self.global_crop_size, 1)
        _check_min("local_crop_size", self.local_crop_size, 1)
        _check_min("n_global_crops", self.n_global_crops, 1)
        _check_min("n_local_crops", self.n_local_crops, 0)
        _check_min("gram_crop_size", self.gram_crop_size, 0)
        _check_range("global_crop_scale", self.global_crop_scale)
        _check_range("local_crop_scale", self.local_crop_scale)
        _check_length("color_jitter", self.color_jitter, 4)
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(
                "color_jitter must be (brightness, contrast, saturation, hue) with all >= 0 and "
                f"hue <= 0.5, got {self.color_jitter}"
            )
        for name in ("hflip_p", "color_jitter_p", "grayscale_p", "solarize_p"):
            _check_probability(name, getattr(self, name))
        _check_length("blur_p", self.blur_p, 3)
        for p in self.blur_p:
            _check_probability("blur_p", p)
        _check_length("blur_sigma", self.blur_sigma, 2)
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        check_normalisation(self.mean, self.std)

    @property
    def n_crops(self) -> int:
        """Total number of views per image."""
        return self.n_global_crops + self.n_local_crops

    def as_dict(self) -> dict[str, Any]:
        """The settings by name, in their order."""
        return dataclasses.asdict(self)


def crop_settings(*settings: Any, **overrides: Any) -> CropSettings:
    """Crop settings as the pipelines take them: one :class:`CropSettings`, or its arguments.

    Args:
        *settings: One ``CropSettings`` (then ``overrides`` replace some of it), or the settings
            in their order (``global_crop_size``, ``local_crop_size``, ...).
        **overrides: Settings by name (``global_crop_size=32``...).

    Returns:
        The checked settings.

    Raises:
        TypeError: For a name that is not a crop setting.
        ValueError: For a value out of range (see :class:`CropSettings`).
    """
    if len(settings) == 1 and isinstance(settings[0], CropSettings):
        return dataclasses.replace(settings[0], **overrides) if overrides else settings[0]
    return CropSettings(*settings, **overrides)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    device: torch.device | None = None,
) -> Tensor:
    """Draw ``n`` RandomResizedCrop boxes the way torchvision does, all at once.

    Each box tries up to 10 (area fraction, log aspect ratio) draws and keeps the first that
    fits in the image; if none fits, it falls back to the central crop with the aspect ratio
    clamped to ``ratio``.

    Args:
        n: Number of boxes.
        height: Image height H.
        width: Image width W.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio w / h.
        device: Device of the result.

    Returns:
        int64 tensor (n, 4) of ``(top, left, h, w)``.
    """
    area = height * width
    fraction = torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1])
    )
    aspect = log_ratio.exp()
    target = area * fraction
    w = (target * aspect).sqrt().round().long()
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (torch.rand(n, device=device) * (height - h + 1)).long()
    left = (torch.rand(n, device=device) * (width - w + 1)).long()
    fallback = ~fits.any(dim=1)
    if fallback.any():
        fh, fw = _central_crop_size(height, width, ratio)
        h = torch.where(fallback, fh, h)
        w = torch.where(fallback, fw, w)
        top = torch.where(fallback, (height - fh) // 2, top)
        left = torch.where(fallback, (width - fw) // 2, left)
    return torch.stack([top, left, h, w], dim=1)


def _central_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Fallback crop (h, w): the whole image, its aspect ratio clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise unless ``mean`` and ``std`` are three values each, with every std positive."""
    _check_length("mean", mean, 3)
    _check_length("std", std, 3)
    if min(std) <= 0:
        raise ValueError(f"std must be > 0 for every channel, got {tuple(std)}")


def _check_min(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_length(name: str, value: Sequence[float], length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{name} must have {length} values, got {tuple(value)}")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be probabilities in [0, 1], got {p}")


def _check_range(name: str, scale: Sequence[float]) -> None:
    _check_length(name, scale, 2)
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")


CROP_SETTINGS = tuple(field.name for field in dataclasses.fields(CropSettings))
"""The names of the crop settings, in their order."""

DEFAULT_CROPS = CropSettings()
"""The reference's settings: the defaults of every pipeline and of the data module."""
