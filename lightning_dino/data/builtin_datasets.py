"""The built-in datasets: in-memory tensors, synthetic images, Fashion-MNIST, torchvision's.

Every dataset here yields ``(image, label)`` pairs with ``label == -1``
(:data:`~lightning_dino.data.image_folders.UNLABELED`) where the data has no labels. Without a
transform, ``image`` is a uint8 tensor (C, H, W) or, for the torchvision datasets, a PIL image;
the multi-crop and evaluation transforms of :mod:`lightning_dino.data.transforms` accept both.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dino.data.image_folders import UNLABELED
from lightning_dino.setting_names import setting

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""


class TensorImageDataset(Dataset):
    """In-memory uint8 images with optional labels.

    Args:
        images: uint8 tensor of shape (N, H, W) or (N, C, H, W) with C in {1, 3}.
        labels: int tensor of shape (N,), or None for all -1.
        transform: Applied to each uint8 (C, H, W) image; None returns the image itself.

    Raises:
        ValueError: If the shapes or dtype are not as above.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must have shape (N, H, W) or (N, C, H, W) with C in {{1, 3}}, "
                f"got {tuple(images.shape)}"
            )
        if labels is None:
            labels = torch.full((len(images),), UNLABELED, dtype=torch.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return ``(image, label)``, the image transformed if a transform is set."""
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class TransformDataset(Dataset):
    """Apply a transform to the images of an ``(image, label)`` dataset.

    Lets one base dataset serve several views (multi-crop for training, the evaluation
    transform for k-NN) without loading or validating it twice.

    Args:
        dataset: Dataset yielding ``(image, label)``.
        transform: Applied to each image.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return ``(transform(image), label)`` for sample ``index``."""
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def make_synthetic_images(
    size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Deterministic random images whose class is learnable from shape and colour.

    Class ``c`` is a sinusoidal grating with its own orientation (in [0, 90) degrees, so a
    horizontal flip never maps one class onto another), spatial frequency and colour;
    each image adds a random phase, a small orientation jitter, a random brightness and
    Gaussian pixel noise. The class patterns do not depend on ``seed``, so two seeds give
    two samples of the same classes (e.g. a train and a held-out set).

    Args:
        size: Number of images N.
        image_size: Side S of the square images, in pixels.
        num_classes: Number of classes; labels are balanced.
        seed: Seed of the per-image randomness.

    Returns:
        ``(images, labels)``: uint8 (N, 3, S, S) and int64 (N,).
    """
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    classes = labels.to(torch.float32)
    angle = (math.pi / 2) * classes / num_classes
    angle = angle + 0.05 * torch.randn(size, generator=generator)
    cycles = 1.5 + (labels % 4).to(torch.float32)
    phase = 2 * math.pi * torch.rand(size, generator=generator)
    coords = torch.arange(image_size, dtype=torch.float32) / image_size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    along = x * angle.cos().view(-1, 1, 1) + y * angle.sin().view(-1, 1, 1)
    grating = torch.sin(2 * math.pi * cycles.view(-1, 1, 1) * along + phase.view(-1, 1, 1))
    hue = 2 * math.pi * classes / num_classes
    colour = 0.55 + 0.4 * torch.stack([hue.cos(), (hue + 2.1).cos(), (hue + 4.2).cos()], 1)
    brightness = 0.8 + 0.4 * torch.rand(size, 1, 1, 1, generator=generator)
    pixels = 255 * brightness * colour.view(-1, 3, 1, 1) * (0.55 + 0.4 * grating.unsqueeze(1))
    pixels = pixels + 12 * torch.randn(pixels.shape, generator=generator)
    return pixels.round().clamp(0, 255).to(torch.uint8), labels


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None, train: bool, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Read a Fashion-MNIST split from its idx files into memory.

    Looks for ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``) in
    ``data_dir``, ``data_dir/FashionMNIST/raw`` (torchvision's layout) and
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

    Args:
        data_dir: Directory to search first and to download into; None searches only the
            Debian location.
        train: The 60,000-image training split if True, else the 10,000-image test split.
        download: Download with ``torchvision.datasets.FashionMNIST`` into ``data_dir``
            when the files are not found.

    Returns:
        ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,).

    Raises:
        FileNotFoundError: If the files are not found (the message lists where it looked).
        ValueError: If a file is not a valid idx file or the counts disagree.
    """
    prefix = "train" if train else "t10k"
    search = _fashion_mnist_dirs(data_dir)
    found = _find_idx_pair(search, prefix)
    if found is None and download:
        if data_dir is None:
            raise ValueError(f"downloading Fashion-MNIST needs {setting('data', 'data_dir')}")
        torchvision.datasets.FashionMNIST(root=str(data_dir), train=train, download=True)
        found = _find_idx_pair(search, prefix)
    if found is None:
        places = "\n".join(f"  {directory}" for directory in search)
        raise FileNotFoundError(
            f"Fashion-MNIST files {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] not found; searched:\n{places}\n"
            f"Fix: `apt-get install dataset-fashion-mnist`, or set {setting('data', 'data_dir')} "
            f"to a directory holding them, or set {setting('data', 'download', True)}."
        )
    images, labels = (read_idx_file(path) for path in found)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{found[0]} holds {tuple(images.shape)} and {found[1]} {tuple(labels.shape)}; "
            "expected (N, H, W) images and N labels"
        )
    return images, labels.to(torch.int64)


def _fashion_mnist_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    user = [] if data_dir is None else [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"]
    return [*user, DEBIAN_FASHION_MNIST_DIR]


def _find_idx_pair(directories: list[Path], prefix: str) -> tuple[Path, Path] | None:
    """First directory holding both the images and labels idx files of ``prefix``."""
    for directory in directories:
        images = _find_file(directory, f"{prefix}-images-idx3-ubyte")
        labels = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_file(path: str | os.PathLike[str]) -> Tensor:
    """Read an unsigned-byte idx file (the MNIST format), gzipped or not.

    Args:
        path: File path; a ``.gz`` suffix means gzip.

    Returns:
        A uint8 tensor with the dimensions stored in the header.

    Raises:
        ValueError: If the header is not an unsigned-byte idx header or the payload size
            does not match it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(
            f"{path}: header declares shape {shape} ({math.prod(shape)} bytes) but the file "
            f"holds {len(data) - header} bytes"
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).copy()).view(shape)


def torchvision_dataset(name: str, data_dir: str, split: str, download: bool = False) -> Dataset:
    """Open CIFAR-10 or STL-10 with torchvision, yielding ``(PIL image, label)``.

    Args:
        name: ``"cifar10"`` or ``"stl10"``.
        data_dir: torchvision root directory (holding ``cifar-10-batches-py`` or
            ``stl10_binary``).
        split: ``"train"`` or ``"test"``; STL-10 also accepts ``"unlabeled"`` and
            ``"train+unlabeled"`` (its unlabeled images have label -1).
        download: Download the files if missing.

    Returns:
        The torchvision dataset (loaded into memory by torchvision).

    Raises:
        FileNotFoundError: If the files are missing and ``download`` is False.
        ValueError: If ``name`` or ``split`` is unknown.
    """
    if name == "cifar10" and split in ("train", "test"):
        opener = torchvision.datasets.CIFAR10
        options: dict[str, Any] = {"train": split == "train"}
    elif name == "stl10" and split in ("train", "test", "unlabeled", "train+unlabeled"):
        opener = torchvision.datasets.STL10
        options = {"split": split}
    else:
        raise ValueError(f"unknown torchvision dataset {name!r} or split {split!r}")
    try:
        return opener(root=data_dir, download=download, **options)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{name} ({split}) not found or corrupted under {data_dir} ({err}); set "
            f"{setting('data', 'data_dir')} to torchvision's {name} root, or set "
            f"{setting('data', 'download', True)}"
        ) from err
