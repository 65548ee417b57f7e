"""DINO multi-crop augmentation and the deterministic evaluation transform.

The augmentations follow the reference code of Caron et al. 2021 (``main_dino.py``
``DataAugmentationDINO``): two global crops and ``n_local_crops`` local crops, each with a
random horizontal flip, colour jitter, random grayscale, and Gaussian blur with a
per-view probability; solarisation on the second global crop only.

Everything runs on ``torchvision.transforms.v2`` with uint8 tensors, which is faster than
PIL. Grayscale inputs stay single-channel through the augmentations (colour jitter,
grayscale, blur and solarisation act on them exactly as on a replicated RGB image) and are
replicated to three channels at the end, so every output fits a backbone with
``in_chans=3``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_dino.data.blur import SeparableGaussianBlur
from lightning_dino.data.color import FastColorJitter
from lightning_dino.data.crops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_normalisation,
    crop_settings,
    sample_crop_boxes,
)

FASHION_MNIST_MEAN: tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD: tuple[float, float, float] = (0.3530, 0.3530, 0.3530)

# PIL modes holding 16-bit (or wider integer) grey levels. They are rescaled to 8 bits,
# not clipped as ``Image.convert`` would. Mode "I" is what 16-bit PNG/TIFF files give on
# some Pillow versions, so it is treated as 16-bit too.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# Reference: kernel ~3 sigma on each side (99.7 % of the Gaussian's mass).
_BLUR_SIGMAS_COVERED = 3.0

# Reference "solarize" uses PIL's default threshold 128 on uint8 images (0.5 on floats);
# our pipeline solarises uint8 tensors.
SOLARIZE_THRESHOLD = 128


def to_uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    """Convert a PIL image or an image tensor to a uint8 tensor, keeping grayscale.

    Args:
        image: A PIL image of any mode (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``I;16``, ``I``,
            ``CMYK``, ``RGB``...) or a uint8 tensor of shape (H, W), (1, H, W) or (3, H, W).
            16-bit grey levels are rescaled to 8 bits (``round(v / 257)``), palette images
            are expanded, alpha is dropped (as in the reference ``pil_loader``).

    Returns:
        A uint8 tensor of shape (1, H, W) for grayscale input, else (3, H, W).

    Raises:
        TypeError: If ``image`` is neither a PIL image nor a uint8 tensor.
        ValueError: If a tensor does not have 1 or 3 channels.
    """
    if isinstance(image, Image.Image):
        return _pil_to_uint8_tensor(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(
            f"expected a uint8 image tensor, got dtype {image.dtype}; "
            "convert with (x * 255).round().to(torch.uint8) for images in [0, 1]"
        )
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image tensor of shape (H, W), (1, H, W) or (3, H, W), "
            f"got {tuple(image.shape)}"
        )
    return image


def to_rgb_uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    """Convert an image like :func:`to_uint8_tensor` and replicate grayscale to 3 channels.

    Args:
        image: A PIL image of any mode or a uint8 tensor (H, W), (1, H, W) or (3, H, W).

    Returns:
        A uint8 tensor of shape (3, H, W) without overlapping elements. A PIL image's pixels
        stay in the channels-last order they were decoded in (a permuted view, no copy),
        which is also the layout of the fast path of antialiased resizing.
    """
    pixels = to_uint8_tensor(image)
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[-3] == 1 else pixels


def _pil_to_uint8_tensor(image: Image.Image) -> Tensor:
    """Convert a PIL image to a uint8 tensor (1, H, W) for grey modes, else (3, H, W)."""
    if image.mode in _WIDE_GRAY_MODES:
        levels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        gray = ((levels + 128) // 257).astype(np.uint8)
        return torch.from_numpy(gray).unsqueeze(0)
    if image.mode in ("1", "F"):
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA").convert("RGB")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return F.pil_to_tensor(image)


def _expand_to_rgb(image: Tensor) -> Tensor:
    """Replicate a (1, H, W) image to (3, H, W) (a view); pass (3, H, W) through."""
    return image.expand(3, -1, -1) if image.shape[-3] == 1 else image


def blur_kernel_size(crop_size: int, max_sigma: float) -> int:
    """Odd Gaussian kernel size covering about 3 sigma on each side, capped by the crop.

    The reference blurs with PIL's ``GaussianBlur(radius=sigma)`` (sigma in pixels of the
    resized crop, unbounded support). A kernel of ``2 * ceil(3 * max_sigma) + 1`` pixels
    keeps 99.7 % of the Gaussian's mass for every sampled sigma: 13 for the default
    sigma range (0.1, 2.0). It is capped at the largest odd size not above the crop size,
    because reflect padding needs the crop to be wider than half the kernel.

    Args:
        crop_size: Side of the crop being blurred, in pixels.
        max_sigma: Largest sigma that will be sampled, in pixels.

    Returns:
        The kernel size, an odd integer >= 1.
    """
    covering = 2 * math.ceil(_BLUR_SIGMAS_COVERED * max_sigma) + 1
    largest_odd_in_crop = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(covering, largest_odd_in_crop))


def min_decode_pixels(views: Sequence[tuple[int, tuple[float, float]]]) -> int:
    """Fewest pixels an image may be decoded at without any ``RandomResizedCrop`` upsampling.

    A crop covering the fraction ``scale`` of an A-pixel image with aspect ratio r in
    [3/4, 4/3] has sides sqrt(A scale r) and sqrt(A scale / r), the shorter at least
    sqrt(3/4 A scale_min). Keeping that at least ``size + 1`` (one pixel for the rounding of
    the box) for every view type bounds A from below. A JPEG decoded at a reduced size
    (:func:`~lightning_dino.data.load_image` with ``min_pixels``) of at least this many
    pixels only ever has its crops downsampled, as the full image's would be.

    Args:
        views: ``(output size, (min scale, max scale))`` of each view type, e.g. the global
            and the local crops.

    Returns:
        The smallest decoded area, in pixels.

    Examples:
        >>> min_decode_pixels([(224, (0.4, 1.0)), (96, (0.05, 0.4))])
        250907
    """
    return max(math.ceil((size + 1) ** 2 / (0.75 * scale[0])) for size, scale in views)


class MultiCropTransform:
    """DINO multi-crop augmentation: ``n_global_crops`` global and ``n_local_crops`` local views.

    Each view is an independent draw of: bicubic antialiased ``RandomResizedCrop`` ->
    horizontal flip -> colour jitter (with probability ``color_jitter_p``) -> random
    grayscale -> Gaussian blur (probability from ``blur_p``) -> solarisation (second and
    later global views only) -> float in [0, 1] -> 3 channels -> normalisation.
    Global view 1 uses ``blur_p[0]``; global views 2 and later use ``blur_p[1]`` and
    ``solarize_p``; local views use ``blur_p[2]``. Defaults are the reference's.

    Args:
        *settings: One :class:`~lightning_dino.data.crops.CropSettings`, or its settings in
            their order (``global_crop_size``, ``local_crop_size``, ``n_local_crops``...).
        **overrides: Settings by name (see ``CropSettings`` for each one and its default).
            The blur kernel size is :func:`blur_kernel_size`; solarisation uses threshold 128.

    Raises:
        ValueError: If a setting is out of range; the message starts with its name.

    Examples:
        >>> transform = MultiCropTransform(global_crop_size=32, local_crop_size=16)
        >>> crops = transform(torch.zeros(3, 40, 40, dtype=torch.uint8))
        >>> len(crops), tuple(crops[0].shape), tuple(crops[2].shape)
        (10, (3, 32, 32), (3, 16, 16))
    """

    def __init__(self, *settings: Any, **overrides: Any) -> None:
        crops = crop_settings(*settings, **overrides)
        self.crops = crops
        self.n_global_crops = crops.n_global_crops
        self.n_local_crops = crops.n_local_crops
        size, scale = crops.global_crop_size, crops.global_crop_scale
        # With Gram crops the global boxes and flips are drawn here, shared with the Gram crop.
        geometry = not crops.gram_crop_size
        self.global_transforms: list[v2.Compose] = [
            self._view_transform(size, scale, crops.blur_p[0], 0.0, geometry)
        ] + [
            self._view_transform(size, scale, crops.blur_p[1], crops.solarize_p, geometry)
            for _ in range(crops.n_global_crops - 1)
        ]
        self.gram_normalise = v2.Compose(_to_normalised_float(list(crops.mean), list(crops.std)))
        self.local_transform: v2.Compose = self._view_transform(
            crops.local_crop_size, crops.local_crop_scale, crops.blur_p[2], 0.0
        )

    @property
    def n_crops(self) -> int:
        """Total number of views returned per image."""
        return self.n_global_crops + self.n_local_crops

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
        """Augment one image into its multi-crop views.

        Args:
            image: A PIL image of any mode, or a uint8 tensor (H, W), (1, H, W) or (3, H, W).

        Returns:
            ``[g1, g2, ..., l1, ..., lN]``: global crops of shape
            (3, global_crop_size, global_crop_size) then local crops of shape
            (3, local_crop_size, local_crop_size), all float32 and normalised. With
            ``gram_crop_size``: ``{"crops": [...], "gram_crops": [G1, G2, ...]}``, the Gram
            crops of the global crops' boxes and flips, (3, gram_crop_size, gram_crop_size),
            undistorted and normalised.
        """
        pixels = to_uint8_tensor(image)
        if self.crops.gram_crop_size:
            global_views, gram_views = self._global_and_gram(pixels)
        else:
            global_views = [transform(pixels) for transform in self.global_transforms]
        local_views = [self.local_transform(pixels) for _ in range(self.n_local_crops)]
        if self.crops.gram_crop_size:
            return {"crops": global_views + local_views, "gram_crops": gram_views}
        return global_views + local_views

    def _global_and_gram(self, pixels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each global crop and its Gram crop: one box and one flip, resampled at both sizes.

        As DINOv3's ``DataAugmentationDINO`` with ``gram_teacher_no_distortions``: the box and
        flip are shared, the colour, blur and solarisation go to the student's crop only.
        """
        crops = self.crops
        height, width = pixels.shape[-2:]
        global_views, gram_views = [], []
        for transform in self.global_transforms:
            top, left, h, w = sample_crop_boxes(1, height, width, crops.global_crop_scale)[0]
            flip = bool(torch.rand(()) < crops.hflip_p)
            box = (int(top), int(left), int(h), int(w))
            views = []
            for size in (crops.global_crop_size, crops.gram_crop_size):
                view = F.resized_crop(
                    pixels, *box, [size, size], v2.InterpolationMode.BICUBIC, antialias=True
                )
                views.append(F.horizontal_flip(view) if flip else view)
            global_views.append(transform(views[0]))
            gram_views.append(self.gram_normalise(views[1]))
        return global_views, gram_views

    def __repr__(self) -> str:
        views = [*self.global_transforms, self.local_transform]
        body = "\n".join(
            f"  {name}: {view}" for name, view in zip(self._view_names(), views, strict=True)
        )
        return f"{type(self).__name__}(\n{body}\n)"

    def _view_names(self) -> list[str]:
        """Labels of the distinct view pipelines, for ``__repr__``."""
        names = [f"global_{i + 1}" for i in range(self.n_global_crops)]
        return [*names, f"local (x{self.n_local_crops})"]

    def _view_transform(
        self,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        geometry: bool = True,
    ) -> v2.Compose:
        """Build one view's pipeline on a uint8 (C, H, W) image, C in {1, 3}.

        Without ``geometry`` the crop and flip are left out (the input is the cut crop).
        """
        crops = self.crops
        steps: list[v2.Transform] = []
        if geometry:
            steps += [
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(p=crops.hflip_p),
            ]
        if any(crops.color_jitter) and crops.color_jitter_p > 0:
            steps.append(
                v2.RandomApply([FastColorJitter(*crops.color_jitter)], p=crops.color_jitter_p)
            )
        if crops.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(p=crops.grayscale_p))
        if blur_p > 0:
            kernel = blur_kernel_size(size, crops.blur_sigma[1])
            blur = SeparableGaussianBlur(kernel_size=kernel, sigma=crops.blur_sigma)
            steps.append(v2.RandomApply([blur], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
        steps += _to_normalised_float(list(crops.mean), list(crops.std))
        return v2.Compose(steps)


class EvalTransform:
    """Deterministic evaluation transform: resize, center crop, normalise.

    ``Resize(resize, bicubic)`` on the shorter side -> ``CenterCrop(size)`` -> float in
    [0, 1] -> 3 channels -> normalisation. By default ``resize = round(size / 0.875)``, the
    reference's 256 -> 224 ratio (e.g. 32 -> 37 for CIFAR-sized images); pass
    ``resize=size`` to only resize (no border is cut away).

    Args:
        size: Output side, in pixels.
        resize: Shorter side after resizing, >= ``size``; None for ``round(size / 0.875)``.
        mean: Per-channel normalisation mean, for images in [0, 1].
        std: Per-channel normalisation std, for images in [0, 1].

    Raises:
        ValueError: If ``size`` < 1 or ``resize`` < ``size``.

    Examples:
        >>> transform = EvalTransform(size=32)
        >>> tuple(transform(torch.zeros(1, 50, 40, dtype=torch.uint8)).shape)
        (3, 32, 32)
    """

    def __init__(
        self,
        size: int = 224,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        resize = round(size / 0.875) if resize is None else resize
        if resize < size:
            raise ValueError(f"resize must be >= size ({size}), got {resize}")
        check_normalisation(mean, std)
        self.size = size
        self.resize = resize
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = v2.Compose(
            [
                v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(size),
                *_to_normalised_float(list(mean), list(std)),
            ]
        )

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """Transform one image.

        Args:
            image: A PIL image of any mode, or a uint8 tensor (H, W), (1, H, W) or (3, H, W).

        Returns:
            A float32 tensor of shape (3, size, size), normalised.
        """
        return self.transform(to_uint8_tensor(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def _to_normalised_float(mean: list[float], std: list[float]) -> list[v2.Transform]:
    """Steps turning a uint8 (C, H, W) image into a normalised float32 (3, H, W) one."""
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(_expand_to_rgb),
        v2.Normalize(mean=mean, std=std),
    ]
