"""The files of a dataset prepared by ``lightning-dino prepare``, without LitData.

Names, decoding and the checks of a prepared directory that need nothing but the files: the
LitData-reading parts are in :mod:`lightning_dino.data.prepared.streaming` and
:mod:`lightning_dino.data.prepared.split` (the ``streaming`` extra).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shlex
import struct
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from lightning_dino.data.image_folders import load_image
from lightning_dino.setting_names import using_cli

METADATA_FILENAME = "lightning_dino.json"
"""Name of the file, beside the splits, that holds the classes and the split sizes."""

METADATA_VERSION = 1

INDEX_FILENAME = "index.json"
"""LitData's index of a split's chunk files (their names, item counts and byte sizes)."""


class CorruptDatasetError(ValueError):
    """A file of a prepared dataset is missing or damaged; the message names it and the fix."""


def decode_image(
    data: bytes | memoryview, min_pixels: int | None = None, min_side: int = 0
) -> Tensor:
    """Decode an encoded image (JPEG, PNG...) held in memory, as ``load_image`` decodes files.

    Args:
        data: The encoded bytes of an image file.
        min_pixels: Allow a reduced-size JPEG decode of at least this many pixels (see
            :func:`~lightning_dino.data.load_image`); None decodes at full size.
        min_side: With ``min_pixels``: the reduced size's shorter side is at least this.

    Returns:
        A uint8 tensor of shape (3, H, W), upright (EXIF orientation applied), RGB.
    """
    return load_image(io.BytesIO(data), min_pixels, min_side)


class DecodeSample:
    """LitData item ``{"image": bytes, "label": int, ...}`` -> ``(transform(image), label)``.

    Given to ``StreamingDataset(transform=...)``, so it runs in the loader's worker processes.

    Args:
        transform: Applied to the decoded uint8 (3, H, W) image; None keeps the image.
        min_pixels: Allow reduced-size JPEG decoding (see :func:`decode_image`).
        min_side: Shorter side of a reduced decode, at least.
    """

    def __init__(
        self,
        transform: Callable[[Tensor], Any] | None = None,
        min_pixels: int | None = None,
        min_side: int = 0,
    ) -> None:
        self.transform = transform
        self.min_pixels, self.min_side = min_pixels, min_side

    def __call__(self, item: Mapping[str, Any]) -> tuple[Any, int]:
        """Decode ``item["image"]`` and transform it.

        Args:
            item: A sample of a prepared dataset.

        Returns:
            ``(image, label)``: the transformed image (uint8 (3, H, W) without a transform) and the
            int label, -1 for an unlabelled image.
        """
        image, label = self.read(item)
        return self.apply(image), label

    def read(self, item: Mapping[str, Any]) -> tuple[Tensor, int]:
        """The decoded uint8 (3, H, W) image and the int label of ``item``, untransformed."""
        return decode_image(item["image"], self.min_pixels, self.min_side), int(item["label"])

    def apply(self, image: Tensor) -> Any:
        """``transform(image)``, or ``image`` without a transform."""
        return self.transform(image) if self.transform else image


def is_url(path: str) -> bool:
    """Whether ``path`` is a remote URL (``s3://``, ``gs://``...) rather than a local path."""
    return "://" in path


def prepare_command(folder: str, out: str = "DIR", overwrite: bool = False) -> str:
    """How to prepare ``folder`` into ``out``: the command under the CLI, else the Python call.

    Args:
        folder: The image folder to name, e.g. ``"FOLDER"``.
        out: The prepared directory to name.
        overwrite: Add ``--overwrite`` (``overwrite=True``): replace a prepared ``out``.

    Returns:
        ``lightning-dino prepare --data_dir FOLDER --out DIR`` or
        ``prepare_streaming_dataset('FOLDER', 'DIR')`` (:mod:`lightning_dino.setting_names`).
    """
    if using_cli():
        flag = " --overwrite" if overwrite else ""
        paths = f"--data_dir {shlex.quote(folder)} --out {shlex.quote(out)}"
        return f"lightning-dino prepare {paths}{flag}"
    keyword = ", overwrite=True" if overwrite else ""
    return f"prepare_streaming_dataset({folder!r}, {out!r}{keyword})"


def split_dir(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL (always with ``/`` for URLs)."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def check_chunks(split: str, fix: str = "") -> None:
    """Check a local split's chunk files against LitData's ``index.json``, reading only headers.

    Each chunk listed in the index must exist; an uncompressed, unencrypted chunk must have the
    byte size the index records and a header (item count, then the item offsets) that agrees with
    the index and the file's size. Damage inside the items' bytes is found when they are read
    (:class:`PreparedSplit`).

    Args:
        split: A local split directory (e.g. ``DIR/train``).
        fix: What to do about it, appended to the message (default: prepare again).

    Raises:
        CorruptDatasetError: Naming the first missing or damaged file.
    """
    fix = fix or fix_advice(parent_dir(split))
    index_path = os.path.join(split, INDEX_FILENAME)
    try:
        with open(index_path) as file:
            index = json.load(file)
        chunks, config = index["chunks"], index.get("config") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptDatasetError(
            f"{index_path} is missing or damaged ({error_name(err)}: {err}); {fix}"
        ) from err
    plain = not config.get("compression") and not config.get("encryption")
    for number, chunk in enumerate(chunks):
        try:
            path = os.path.join(split, chunk["filename"])
            problem = _chunk_problem(path, chunk, plain)
        except (KeyError, TypeError, ValueError, struct.error) as err:
            raise CorruptDatasetError(
                f"{index_path} is damaged: its chunk {number} reads {chunk!r} "
                f"({error_name(err)}: {err}); {fix}"
            ) from err
        if problem:
            raise CorruptDatasetError(f"{path} is damaged: {problem}; {fix}")


def _chunk_problem(path: str, chunk: Mapping[str, Any], plain: bool) -> str | None:
    """Why a chunk file does not match its ``index.json`` entry, or None if it does."""
    if not os.path.isfile(path):
        return "the file is missing"
    size = os.path.getsize(path)
    if not plain:  # compressed or encrypted: the index records the sizes before
        return None
    if size != chunk["chunk_bytes"]:
        return f"it has {size} bytes, {INDEX_FILENAME} records {chunk['chunk_bytes']} (truncated?)"
    n = chunk["chunk_size"]
    header = 4 * (n + 2)  # the item count, then n + 1 offsets (uint32, little-endian)
    with open(path, "rb") as file:
        data = file.read(header)
    if len(data) < header:
        return f"{size} bytes cannot hold the header of {n} items"
    count, *offsets = struct.unpack(f"<{n + 2}I", data)
    if count != n:
        return f"its header counts {count} items, {INDEX_FILENAME} records {n}"
    ordered = all(a <= b for a, b in itertools.pairwise(offsets))
    if offsets[0] != header or not ordered or offsets[-1] > size:
        return f"its item offsets do not fit its {size} bytes"
    return None


def fix_advice(root: str, source: str = "FOLDER") -> str:
    """What to do about a damaged file of the prepared dataset at ``root``.

    Args:
        root: The prepared directory or URL.
        source: The image folder it was prepared from.

    Returns:
        Prepare the folder again (``--overwrite``); for a URL, also copy it there again, unless
        only the cached copy of a chunk is damaged.
    """
    if is_url(root):
        return (
            f"if only the copy in LitData's chunk cache is damaged, delete it to download it "
            f"again; else prepare the folder again (`{prepare_command(source, 'DIR', True)}`) "
            f"and copy DIR to {root}"
        )
    return f"prepare the folder again: `{prepare_command(source, root, True)}`"


def parent_dir(split: str) -> str:
    """The prepared directory or URL that holds the split ``split``."""
    return split.rstrip("/").rsplit("/", 1)[0] if is_url(split) else os.path.dirname(split)


def error_name(error: BaseException) -> str:
    """``ValueError``, ``struct.error``, ``PIL.UnidentifiedImageError``: an error's type, named."""
    module, name = type(error).__module__, type(error).__qualname__
    return name if module == "builtins" else f"{module}.{name}"
