"""Stream a dataset prepared by ``lightning-dino prepare`` with LitData, on one node or many.

``lightning-dino prepare`` (:func:`lightning_dino.io.prepare.prepare`) writes an image folder as a
LitData optimised dataset: the files' encoded bytes (JPEG, PNG... as found) in chunks, with their
labels. The layout of a prepared directory ``DIR`` (a local path or a URL such as ``s3://...``)::

    DIR/lightning_dino.json   classes and split sizes (:data:`METADATA_FILENAME`)
    DIR/train/                the training images: labelled ones first, then unlabelled ones
    DIR/val/                  held-out labelled images for k-NN val (absent when there are none)

Training streams ``DIR/train`` through LitData's ``StreamingDataset`` and ``StreamingDataLoader``:
LitData shuffles (seeded, a new order each epoch), gives each rank and each worker a disjoint part
of every epoch, and saves where the epoch stands in the loader's ``state_dict()``, which Lightning
stores in every checkpoint, so a resumed run continues with the samples not yet seen. Images are
decoded in the loader's workers (:class:`DecodeSample`); the multi-crop augmentation then runs
wherever ``--data.augmentation`` says, as for an image folder. The k-NN splits are read by position
(:class:`StreamingImages`), in a fixed order.

A damaged prepared directory stops the run with a :class:`CorruptDatasetError` naming the file and
how to prepare the folder again: opening a local directory (:meth:`PreparedDataset.open`, before
any loader worker starts) checks every split's ``index.json`` and the header of each chunk file
against it (:func:`check_chunks`), and a sample whose bytes cannot be read or decoded later (damage
inside a chunk that its header does not show, or in the cached copy of a remote chunk) names its
chunk when it is read (:class:`PreparedSplit`).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import os
import shlex
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from litdata import StreamingDataLoader, StreamingDataset
from litdata.exceptions import ChunkWaitTimeoutError
from litdata.streaming.downloader import get_downloader
from litdata.streaming.sampler import ChunkedIndex
from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate

from lightning_dino.data.datasets import load_image
from lightning_dino.naming import setting, using_cli

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


class PreparedSplit(StreamingDataset):
    """LitData's ``StreamingDataset`` of a prepared split whose read errors name the chunk.

    An item that LitData cannot read, or whose image does not decode (``prepare`` decoded every
    stored image once, so it is damage), raises :class:`CorruptDatasetError` naming the chunk
    file, the item and ``fix``; the transform's own errors pass through unchanged.

    Args:
        input_dir: The split's directory or URL (e.g. ``DIR/train``).
        decode: Decodes and transforms each item in the workers (``(image, label)`` samples);
            None yields LitData's items (``{"index", "image", "label"}`` dicts).
        fix: What to do about a damaged chunk (how to prepare the dataset again).
        **kwargs: ``StreamingDataset``'s other arguments (not ``transform``).
    """

    def __init__(
        self, input_dir: str, decode: DecodeSample | None = None, fix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(input_dir, **kwargs)
        self.split, self.decode = input_dir, decode
        self.fix = fix or _fix(_parent(input_dir))

    def __getitem__(self, index: Any) -> Any:
        """The item (or decoded sample) at ``index``; see the class description."""
        if not isinstance(index, int | ChunkedIndex):  # slices, keys: LitData's own
            return super().__getitem__(index)
        with self.naming_chunk(index):
            item = super().__getitem__(index)
            if self.decode is None:
                return item
            image, label = self.decode.read(item)
        return self.decode.apply(image), label

    @contextmanager
    def naming_chunk(self, index: int | ChunkedIndex) -> Iterator[None]:
        """Re-raise an error of the block as :class:`CorruptDatasetError` naming the chunk.

        Args:
            index: The item read in the block: a global position or LitData's ``ChunkedIndex``.

        Yields:
            Nothing.

        Raises:
            CorruptDatasetError: For any error but an ``IndexError``, a ``CorruptDatasetError``
                already raised and a remote download's timeout.
        """
        try:
            yield
        except (IndexError, CorruptDatasetError):
            raise
        except Exception as err:
            if isinstance(err, ChunkWaitTimeoutError) and is_url(self.split):
                raise  # a slow or hung download, not a damaged chunk
            raise self._corrupt(index, err) from err

    def _corrupt(self, index: int | ChunkedIndex, error: Exception) -> CorruptDatasetError:
        """The error naming the chunk of ``index``, the failure and the fix."""
        position = index if isinstance(index, int) else index.index
        chunk = self._chunk_of(index)
        where = chunk or f"the chunk of item {position}"
        if chunk and is_url(self.split):
            where += " (read from its copy in LitData's chunk cache)"
        return CorruptDatasetError(
            f"{where} is damaged: item {position} of {self.split} cannot be read "
            f"({_error_name(error)}: {error}); {self.fix}"
        )

    def _chunk_of(self, index: int | ChunkedIndex) -> str | None:
        """The path or URL of the chunk file holding ``index``, or None if it cannot be told."""
        try:
            if isinstance(index, ChunkedIndex):
                chunk = index.chunk_index
            else:  # the chunks hold consecutive items, region_of_interest counts them
                sizes = (end - start for start, end in self.region_of_interest)
                chunk = bisect.bisect_right(list(itertools.accumulate(sizes)), index)
            return split_dir(self.split, self.subsampled_files[chunk])
        except (IndexError, TypeError, ValueError):
            return None


class StreamingImages(Dataset):
    """Random access to a prepared split: ``(uint8 (3, H, W) image, label)`` by position.

    Every process reads all of it (no sharding), as the k-NN evaluation needs.

    Args:
        input_dir: The split's directory or URL (e.g. ``DIR/val``).
        cache_dir: LitData's chunk cache for a remote split; None uses LitData's default.
        fix: What to do about a damaged chunk (see :class:`PreparedSplit`).
    """

    def __init__(self, input_dir: str, cache_dir: str | None = None, fix: str = "") -> None:
        self.input_dir = input_dir
        self.dataset = PreparedSplit(input_dir, cache_dir=cache_dir, fix=fix)
        self.decode = DecodeSample()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Decode the sample at ``index``; see the class description.

        Raises:
            CorruptDatasetError: If the sample cannot be read or decoded.
        """
        with self.dataset.naming_chunk(index):
            return self.decode(self.dataset[index])


@dataclass
class PreparedDataset:
    """A directory written by ``lightning-dino prepare``, opened for training and k-NN.

    Attributes:
        root: The directory or URL.
        classes: Class names, label ``i`` being ``classes[i]``; empty for an unlabelled folder.
        train_size: Images in the ``train`` split.
        train_labelled: How many of them (the first ones) have a label.
        val_size: Images in the ``val`` split (0 when it is absent).
        cache_dir: LitData's chunk cache for a remote dataset (None: LitData's default).
        source: The image folder it was prepared from (named in the fix of a damaged chunk).
    """

    root: str
    classes: list[str]
    train_size: int
    train_labelled: int
    val_size: int
    cache_dir: str | None = None
    source: str = "FOLDER"

    @classmethod
    def open(cls, root: str, cache_dir: str | None = None) -> PreparedDataset:
        """Read the metadata of a prepared directory and, when local, check its chunk files.

        Args:
            root: The ``--out`` of ``lightning-dino prepare``: a local path or a URL.
            cache_dir: LitData's chunk cache (also where a remote metadata file is fetched to).

        Returns:
            The opened dataset.

        Raises:
            FileNotFoundError: If ``root`` holds no ``lightning_dino.json``.
            ValueError: If that file is of another format version.
            CorruptDatasetError: If a local split's ``index.json`` or a chunk file is missing,
                or a chunk's size or header does not match the index (:func:`check_chunks`).
        """
        metadata = _read_metadata(root, cache_dir)
        if metadata.get("version") != METADATA_VERSION:
            raise ValueError(
                f"{split_dir(root, METADATA_FILENAME)} has format version "
                f"{metadata.get('version')!r}; this lightning-dino reads version "
                f"{METADATA_VERSION}: prepare the folder again "
                f"({setting('prepare_streaming_dataset', 'overwrite', True)})"
            )
        splits = metadata["splits"]
        val = splits.get("val", {"size": 0})
        prepared = cls(
            root=root,
            classes=list(metadata["classes"]),
            train_size=splits["train"]["size"],
            train_labelled=splits["train"]["labelled"],
            val_size=val["size"],
            cache_dir=cache_dir,
            source=str(metadata.get("source") or "FOLDER"),
        )
        if not is_url(root):
            for name in ("train", "val") if prepared.val_size else ("train",):
                check_chunks(split_dir(root, name), prepared.fix)
        return prepared

    @property
    def fix(self) -> str:
        """What to do about a damaged chunk: prepare the folder again (and copy it, if remote)."""
        return _fix(self.root, self.source)

    def train_stream(
        self,
        transform: Callable[[Tensor], Any] | None = None,
        seed: int = 0,
        decode_sizes: Mapping[str, int] | None = None,
    ) -> StreamingDataset:
        """The shuffled ``train`` split as a LitData ``StreamingDataset`` of ``(image, label)``.

        Build it inside each training process (after the process group is up): LitData reads
        the world size and rank when the dataset is created.

        Args:
            transform: Applied to each decoded uint8 (3, H, W) image in the workers.
            seed: Seed of the shuffles, the same on every rank.
            decode_sizes: ``min_pixels`` / ``min_side`` of reduced-size JPEG decoding (see
                :func:`decode_image`); None decodes at full size.

        Returns:
            A ``litdata.StreamingDataset`` (:class:`PreparedSplit`) that drops the tail of an
            epoch so every rank and worker gets whole batches of the same count.
        """
        return PreparedSplit(
            split_dir(self.root, "train"),
            DecodeSample(transform, **(decode_sizes or {})),
            self.fix,
            cache_dir=self.cache_dir,
            shuffle=True,
            drop_last=True,
            seed=seed,
        )

    def knn_train(self) -> Dataset | None:
        """The labelled training images in a fixed order, or None for unlabelled data."""
        if not self.classes or self.train_labelled == 0:
            return None
        images = StreamingImages(split_dir(self.root, "train"), self.cache_dir, self.fix)
        if self.train_labelled == self.train_size:
            return images
        return Subset(images, range(self.train_labelled))

    def knn_val(self) -> Dataset | None:
        """The held-out labelled images in a fixed order, or None without a ``val`` split."""
        if self.val_size == 0:
            return None
        return StreamingImages(split_dir(self.root, "val"), self.cache_dir, self.fix)


def streaming_loader(
    dataset: StreamingDataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> StreamingDataLoader:
    """A LitData ``StreamingDataLoader`` of whole batches whose ``state_dict`` resumes mid-epoch.

    Lightning saves the loader's ``state_dict()`` in each checkpoint (in the fit loop's state,
    ``loops.fit_loop.state_dict.combined_loader``) and loads it before the resumed epoch starts;
    resume with the same devices, ``batch_size`` and ``num_workers`` to continue with exactly the
    samples not yet seen.

    Args:
        dataset: A ``StreamingDataset`` (:meth:`PreparedDataset.train_stream`).
        batch_size: Samples per batch and process.
        num_workers: Worker processes (0 reads in the main process).
        collate_fn: Builds a batch from a list of ``(image, label)``; None stacks them.
        pin_memory: Pin the batches' host memory.

    Returns:
        The ``litdata.StreamingDataLoader``.
    """
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn or default_collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )


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
        ``prepare_streaming_dataset('FOLDER', 'DIR')`` (:mod:`lightning_dino.naming`).
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


def _read_metadata(root: str, cache_dir: str | None) -> dict[str, Any]:
    """The JSON of ``root/lightning_dino.json``, fetched first when ``root`` is a URL."""
    path = split_dir(root, METADATA_FILENAME)
    missing = (
        f"{path} not found: {setting('data', 'data_dir')} must be a directory written by "
        f"`{prepare_command('FOLDER')}` (or its copy in object storage); run prepare first"
    )
    if not is_url(root):
        if not os.path.isfile(path):
            raise FileNotFoundError(missing)
        with open(path) as file:
            return json.load(file)
    with tempfile.TemporaryDirectory(dir=cache_dir) as local_dir:
        local = os.path.join(local_dir, METADATA_FILENAME)
        try:
            get_downloader(root, local_dir, []).download_file(path, local)
        except Exception as err:  # each storage client raises its own errors
            raise FileNotFoundError(f"{missing} ({type(err).__name__}: {err})") from err
        with open(local) as file:
            return json.load(file)


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
    fix = fix or _fix(_parent(split))
    index_path = os.path.join(split, INDEX_FILENAME)
    try:
        with open(index_path) as file:
            index = json.load(file)
        chunks, config = index["chunks"], index.get("config") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptDatasetError(
            f"{index_path} is missing or damaged ({_error_name(err)}: {err}); {fix}"
        ) from err
    plain = not config.get("compression") and not config.get("encryption")
    for number, chunk in enumerate(chunks):
        try:
            path = os.path.join(split, chunk["filename"])
            problem = _chunk_problem(path, chunk, plain)
        except (KeyError, TypeError, ValueError, struct.error) as err:
            raise CorruptDatasetError(
                f"{index_path} is damaged: its chunk {number} reads {chunk!r} "
                f"({_error_name(err)}: {err}); {fix}"
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


def _fix(root: str, source: str = "FOLDER") -> str:
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


def _parent(split: str) -> str:
    """The prepared directory or URL that holds the split ``split``."""
    return split.rstrip("/").rsplit("/", 1)[0] if is_url(split) else os.path.dirname(split)


def _error_name(error: BaseException) -> str:
    """``ValueError``, ``struct.error``, ``PIL.UnidentifiedImageError``: an error's type, named."""
    module, name = type(error).__module__, type(error).__qualname__
    return name if module == "builtins" else f"{module}.{name}"
