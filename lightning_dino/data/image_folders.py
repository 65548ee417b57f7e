"""Image folders: the files of a tree of images, read the way phone photos and odd files need.

:class:`ImageFolderDataset` yields ``(image, label)`` pairs (label ``-1``, :data:`UNLABELED`,
where the tree has no class folders), skipping unreadable files with one warning that names
them; :func:`load_image` decodes one file (EXIF rotation, 16-bit grey, palette, alpha, reduced
JPEG decoding); :func:`hold_out` draws the fixed k-NN validation part of a folder without
``val/``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dino.data.transforms import to_rgb_uint8_tensor
from lightning_dino.setting_names import setting

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


# Fixes the folder hold-out (and the data module's ``subset`` draw).
SPLIT_SEED = 0


def hold_out(indices: list[int], fraction: float) -> list[int]:
    """A fixed random ``ceil(fraction * n)`` of ``indices``, leaving at least one out.

    Args:
        indices: The labelled images' indices.
        fraction: Fraction to hold out; 0 holds out nothing.

    Returns:
        The held-out indices, the same for the same inputs on every machine and rank.
    """
    if fraction == 0:
        return []
    count = min(math.ceil(fraction * len(indices)), len(indices) - 1)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(indices), generator=generator)[:count].tolist()
    return [indices[i] for i in order]
