"""Datasets for DINO pre-training and k-NN evaluation.

Every dataset here yields ``(image, label)`` pairs with ``label == -1`` (:data:`UNLABELED`)
where the data has no labels. Without a transform, ``image`` is a uint8 tensor
(C, H, W) or, for the torchvision datasets, a PIL image; the multi-crop and evaluation
transforms of :mod:`lightning_dino.data.transforms` accept both.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dino.data.transforms import to_rgb_uint8_tensor
from lightning_dino.naming import setting

UNLABELED = -1
"""Label of images that have none (flat folders, STL-10's unlabeled split)."""

_COMMON_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
# Formats only some Pillow builds read (AVIF from Pillow 11.2, HEIC/HEIF with pillow-heif).
_OPTIONAL_EXTENSIONS = (".avif", ".heic", ".heif", ".jxl")

IMG_EXTENSIONS: tuple[str, ...] = _COMMON_EXTENSIONS + tuple(
    ext for ext in _OPTIONAL_EXTENSIONS if ext in Image.registered_extensions()
)
"""Extensions read as images: the common ones, and AVIF / HEIC / JPEG XL where Pillow reads them."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""

# Formats whose truncation the header pass catches without decoding: PNG by ``verify()``,
# WebP because Pillow reads the whole file when opening it, JPEG by its end marker.
_VERIFIED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
_MAX_NAMED_FILES = 20  # skipped files named in the warning; all are in ``.skipped``
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL_BYTES = 1024  # encoders may pad after the end-of-image marker


class ImageFolderDataset(Dataset):
    """Images under a directory, flat or with one subfolder per class.

    Layout: when ``root`` has subfolders holding images, each top-level subfolder name is a
    class (sorted, labels ``0..C-1``; images nested deeper belong to their top-level
    folder) and images directly in ``root`` get label -1 (they still serve
    self-supervised training). A flat folder gives every image label -1. Files whose
    extension (case-insensitive) is not in ``extensions`` are ignored, and so are hidden
    files and folders (name starting with "."), such as macOS ``._*`` resource forks.

    Unreadable images are found in two places:

    * At construction, a fast pass (:func:`image_file_problem`) finds zero-byte,
      random-byte and zero-size files, images above ``PIL.Image.MAX_IMAGE_PIXELS``
      (decompression bombs; raise that limit to accept bigger images), and truncated
      files. It reads headers only, except for PNG (CRC pass), JPEGs lacking their end
      marker, and formats other than JPEG/PNG/WebP, which it decodes. With
      ``skip_corrupt`` the bad files are dropped with ONE warning that counts and names
      them (all are in :attr:`skipped`); otherwise the first one raises.
    * At load time, an image that still fails to decode (e.g. a JPEG corrupt inside, or
      a file changed since) is replaced by the next decodable sample (deterministic),
      with a warning, and recorded in :attr:`failed_at_load` of the process (each
      DataLoader worker has its own copy). The replacement may come from outside a
      :class:`~torch.utils.data.Subset` of this dataset.

    Args:
        root: Directory holding the images.
        transform: Applied to each uint8 (3, H, W) image; None returns the image itself.
        extensions: Accepted file extensions, lower case with the dot.
        skip_corrupt: Skip unreadable files with a warning instead of raising.
        class_to_idx: Fixed class name -> label map (e.g. a train split's, for its val
            split); None derives it from the subfolders.
        min_pixels: Let :func:`load_image` decode JPEGs at a reduced size of at least this
            many pixels; None (default) decodes at full size.
        min_side: With ``min_pixels``: the reduced size's shorter side is at least this.

    Raises:
        FileNotFoundError: If ``root`` is missing, not a directory, or holds no image.
        ValueError: If a file is unreadable and ``skip_corrupt`` is False, if every image is
            unreadable, or if a subfolder is not in ``class_to_idx``.

    Examples:
        >>> dataset = ImageFolderDataset("photos/")  # doctest: +SKIP
        >>> image, label = dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Tensor], Any] | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        skip_corrupt: bool = True,
        class_to_idx: Mapping[str, int] | None = None,
        min_pixels: int | None = None,
        min_side: int = 0,
    ) -> None:
        self.root = Path(root)
        self.min_pixels, self.min_side = min_pixels, min_side
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        found = find_image_files(self.root, extensions)
        folders = sorted({folder for _, folder in found if folder is not None})
        self.class_to_idx = (
            dict(class_to_idx)
            if class_to_idx is not None
            else {name: i for i, name in enumerate(folders)}
        )
        _check_known_classes(self.root, folders, self.class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        candidates = [
            (path, UNLABELED if folder is None else self.class_to_idx[folder])
            for path, folder in found
        ]
        self.samples, self.skipped = self._validate(candidates)
        self.failed_at_load: dict[str, str] = {}

    @property
    def labels(self) -> list[int]:
        """Label of every sample, -1 for unlabeled ones."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Load sample ``index``, or the next decodable one if it fails to decode.

        Args:
            index: Sample index in ``[0, len(self))``.

        Returns:
            ``(image, label)``: the transformed uint8 (3, H, W) image and its label.

        Raises:
            ValueError: If decoding fails and ``skip_corrupt`` is False.
            RuntimeError: If no image of the dataset can be decoded.
        """
        for candidate in _wrapped_range(index, len(self.samples)):
            path, label = self.samples[candidate]
            if path in self.failed_at_load:
                continue
            try:
                image = load_image(path, self.min_pixels, self.min_side)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
                self._record_load_failure(path, err)
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"no image under {self.root} could be decoded")

    def _record_load_failure(self, path: str, err: Exception) -> None:
        reason = f"{type(err).__name__}: {err}"
        if not self.skip_corrupt:
            raise ValueError(
                f"cannot decode image {path} ({reason}); fix or delete it, or set "
                f"{setting('data', 'skip_corrupt', True)} to skip such files"
            ) from err
        self.failed_at_load[path] = reason
        warnings.warn(
            f"cannot decode image {path} ({reason}); using the next image instead",
            stacklevel=3,
        )

    def _validate(
        self, candidates: list[tuple[str, int]]
    ) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
        """Split ``(path, label)`` pairs into readable samples and ``(path, reason)`` skips."""
        samples, skipped = [], []
        for path, label in candidates:
            problem = image_file_problem(path)
            if problem is None:
                samples.append((path, label))
            elif self.skip_corrupt:
                skipped.append((path, problem))
            else:
                raise ValueError(
                    f"unreadable image file {path} ({problem}); fix or delete it, or set "
                    f"{setting('data', 'skip_corrupt', True)} to skip such files"
                )
        if skipped:
            warnings.warn(_skipped_message(self.root, skipped), stacklevel=3)
        if not samples:
            raise ValueError(
                f"none of the {len(candidates)} image files under {self.root} "
                "is readable; see the warning above for the reasons"
            )
        return samples, skipped


def find_image_files(
    root: Path, extensions: Sequence[str] = IMG_EXTENSIONS
) -> list[tuple[str, str | None]]:
    """List image files under ``root``, sorted, with their top-level folder.

    Args:
        root: Directory to scan (symbolic links are followed).
        extensions: Accepted extensions, matched case-insensitively.

    Returns:
        ``(path, folder)`` pairs where ``folder`` is the name of the top-level subfolder
        holding the file, or None for files directly in ``root``.

    Raises:
        FileNotFoundError: If ``root`` is missing, not a directory, or holds no image.
    """
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"image folder {root} {what}; expected a directory of images, either flat "
            "(root/img.jpg) or with one subfolder per class (root/<class>/img.jpg)"
        )
    accepted = tuple(ext.lower() for ext in extensions)
    scan = _Scan(root, accepted)
    found: list[tuple[str, str | None]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += [(path, entry.name) for path in scan.walk(entry.path)]
        elif scan.accepts(entry.path):
            found.append((entry.path, None))
    scan.report()
    if not found:
        raise FileNotFoundError(
            f"no image files found under {root}; expected files with one of the extensions "
            f"{', '.join(accepted)} (any case), flat or in one subfolder per class"
        )
    return found


class _Scan:
    """One walk of an image folder: which files it takes, which it ignores, where links lead.

    Directory symbolic links are followed, but a directory is entered once whatever the path
    that reaches it (a link back to a parent would otherwise repeat every image under it, over
    and over), and links that lead out of the folder are reported.
    """

    def __init__(self, root: Path, accepted: tuple[str, ...]) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.accepted = accepted
        self.ignored: dict[str, list[str]] = {}
        self.outside: list[tuple[str, str]] = []
        self.repeated: list[tuple[str, str]] = []
        self._visited: dict[str, str] = {self.real_root: str(root)}

    def accepts(self, path: str) -> bool:
        """Whether ``path`` has an image extension (remembering it among the ignored if not)."""
        if path.lower().endswith(self.accepted):
            return True
        suffix = os.path.splitext(path)[1].lower() or "(no extension)"
        self.ignored.setdefault(suffix, []).append(path)
        return False

    def walk(self, top: str) -> Iterator[str]:
        """Yield the image paths under ``top`` in sorted order, skipping hidden entries."""
        if not self._enter(top):
            return
        for directory, subdirs, files in os.walk(top, followlinks=True):
            subdirs[:] = [
                d
                for d in sorted(subdirs)
                if not d.startswith(".") and self._enter(os.path.join(directory, d))
            ]
            for name in sorted(files):
                if not name.startswith(".") and self.accepts(os.path.join(directory, name)):
                    yield os.path.join(directory, name)

    def _enter(self, directory: str) -> bool:
        real = os.path.realpath(directory)
        if real in self._visited:
            self.repeated.append((directory, self._visited[real]))
            return False
        self._visited[real] = directory
        if os.path.islink(directory) and os.path.commonpath([real, self.real_root]) != (
            self.real_root
        ):
            self.outside.append((directory, real))
        return True

    def report(self) -> None:
        """Warn once about ignored files, repeated directories and links leaving the folder."""
        messages = []
        if self.ignored:
            ignored = sorted(self.ignored.items())
            counts = ", ".join(f"{ext} ({len(paths)})" for ext, paths in ignored)
            examples = [path for paths in self.ignored.values() for path in paths][:3]
            messages.append(
                f"ignored {sum(map(len, self.ignored.values()))} file(s) under {self.root} whose "
                f"extension is not an image extension: {counts}; e.g. {', '.join(examples)}. "
                f"Images are read from files ending in {', '.join(self.accepted)}."
            )
        if self.repeated:
            pairs = "; ".join(f"{link} (= {first})" for link, first in self.repeated[:5])
            messages.append(
                f"{len(self.repeated)} folder(s) under {self.root} are links to folders already "
                f"read (a link loop or a second link to one folder), read once: {pairs}"
            )
        if self.outside:
            pairs = "; ".join(f"{link} -> {real}" for link, real in self.outside[:5])
            messages.append(
                f"{len(self.outside)} folder link(s) under {self.root} lead outside it and were "
                f"followed: {pairs}"
            )
        for message in messages:
            warnings.warn(message, stacklevel=4)


def _check_known_classes(root: Path, folders: list[str], class_to_idx: Mapping[str, int]) -> None:
    unknown = [folder for folder in folders if folder not in class_to_idx]
    if unknown:
        raise ValueError(
            f"class folders {unknown} under {root} are not among the known classes "
            f"{sorted(class_to_idx)}; every class of a validation split must exist in "
            "the training split"
        )


def _wrapped_range(start: int, length: int) -> Iterator[int]:
    """Yield ``start, start + 1, ...`` modulo ``length``, ``length`` indices in all."""
    return ((start + offset) % length for offset in range(length))


def _skipped_message(root: Path, skipped: list[tuple[str, str]]) -> str:
    named = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:_MAX_NAMED_FILES])
    more = len(skipped) - _MAX_NAMED_FILES
    tail = f"\n  ... and {more} more (see the dataset's .skipped)" if more > 0 else ""
    return f"skipped {len(skipped)} unreadable image file(s) under {root}:\n{named}{tail}"


def image_file_problem(path: str) -> str | None:
    """Cheaply check that a file looks like a readable image.

    Opens the header (format, size), rejecting sizes above ``PIL.Image.MAX_IMAGE_PIXELS``
    (None disables the limit), and CRC-checks PNG chunks with ``verify()``; none of this
    decodes pixels. A JPEG is decoded only when its last kilobyte lacks the end-of-image
    marker, the sign of a truncated file. WebP files are read whole by Pillow when opened.
    Other formats (GIF, BMP, TIFF, PPM/PGM, ...), which have no cheap integrity check,
    are decoded.

    Args:
        path: Image file path.

    Returns:
        None if the file looks readable, else the reason it is not.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                image_format = image.format
                image.verify()
            if width < 1 or height < 1:
                return f"zero-size image ({width}x{height})"
            if _needs_decoding(image_format, path):
                load_image(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        return f"{type(err).__name__}: {err}"
    return None


def _needs_decoding(image_format: str | None, path: str) -> bool:
    """Whether the header checks leave truncation undetected, so a full decode is due."""
    if image_format == "JPEG":
        return _jpeg_looks_truncated(path)
    return image_format not in _VERIFIED_FORMATS


def _jpeg_looks_truncated(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(max(0, os.path.getsize(path) - _JPEG_TAIL_BYTES))
        return _JPEG_EOI not in file.read()


def load_image(
    path: str | os.PathLike[str] | BinaryIO, min_pixels: int | None = None, min_side: int = 0
) -> Tensor:
    """Decode an image file of any PIL mode to RGB, upright.

    The EXIF orientation tag (set by phone cameras, which store the pixels as the sensor saw
    them) is applied, so the image is the way photo viewers show it.

    With ``min_pixels``, a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 of its
    size (DCT scaling, PIL's ``draft``: several times faster for phone photos), the
    strongest reduction that keeps at least ``min_pixels`` pixels and a shorter side of at
    least ``min_side``. Training passes
    :func:`~lightning_dino.data.transforms.min_decode_pixels` (and the evaluation resize as
    ``min_side``), so no crop is upsampled that the full decode would have downsampled;
    crop boxes are then drawn from the reduced size (the same area fractions and aspect
    ratios, on a coarser pixel grid). Other formats are always decoded at full size.

    Args:
        path: Image file path, or a binary file object holding an encoded image.
        min_pixels: Fewest pixels a reduced decode may have; None decodes at full size.
        min_side: Shortest side a reduced decode may have (with ``min_pixels`` only).

    Returns:
        A uint8 tensor of shape (3, H, W); see
        :func:`~lightning_dino.data.transforms.to_uint8_tensor` for the mode conversions
        (16-bit scaled to 8 bits, palette expanded, alpha dropped, gray replicated).
    """
    with Image.open(path) as image:
        if min_pixels is not None and image.format == "JPEG":
            reduction = jpeg_reduction(image.size, min_pixels, min_side)
            if reduction > 1:
                width, height = image.size
                # PIL picks the reduction from the floor of the size ratio.
                image.draft("RGB", (width // reduction, height // reduction))
        image.load()
        return to_rgb_uint8_tensor(ImageOps.exif_transpose(image))


def jpeg_reduction(size: tuple[int, int], min_pixels: int, min_side: int = 0) -> int:
    """Strongest JPEG DCT reduction (1, 2, 4 or 8) that keeps ``min_pixels`` and ``min_side``.

    Args:
        size: (width, height) of the full image.
        min_pixels: Fewest pixels the reduced image may have.
        min_side: Shortest side the reduced image may have.

    Returns:
        The reduction factor; the decoded image is ceil(width / f) x ceil(height / f).
    """
    width, height = size
    for reduction in (8, 4, 2):
        reduced_w, reduced_h = -(-width // reduction), -(-height // reduction)
        fits = reduced_w * reduced_h >= min_pixels and min(reduced_w, reduced_h) >= min_side
        if fits and min(width, height) >= reduction:
            return reduction
    return 1


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
