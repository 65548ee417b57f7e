"""Stream a dataset prepared by ``lightning-dino prepare`` with LitData, on one node or many.

``lightning-dino prepare``
(:func:`~lightning_dino.data.prepared.writer.prepare_streaming_dataset`) writes an image folder
as a LitData optimised dataset: the files' encoded bytes (JPEG, PNG... as found) in chunks,
with their labels. The layout of a prepared directory ``DIR`` (a local path or a URL such as ``s3://...``)::

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

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate

from lightning_dino.data.prepared.files import (
    INDEX_FILENAME,
    METADATA_FILENAME,
    METADATA_VERSION,
    CorruptDatasetError,
    DecodeSample,
    check_chunks,
    decode_image,
    fix_advice,
    is_url,
    prepare_command,
    split_dir,
)
from lightning_dino.extras import require
from lightning_dino.setting_names import setting

if TYPE_CHECKING:
    from litdata import StreamingDataLoader, StreamingDataset

    from lightning_dino.data.prepared.split import PreparedSplit

__all__ = [
    "INDEX_FILENAME",
    "METADATA_FILENAME",
    "METADATA_VERSION",
    "CorruptDatasetError",
    "DecodeSample",
    "PreparedDataset",
    "StreamingImages",
    "check_chunks",
    "decode_image",
    "is_url",
    "prepare_command",
    "split_dir",
    "streaming_loader",
]

_PURPOSE = "Streaming datasets (--data.dataset streaming, lightning-dino prepare)"


def prepared_split(input_dir: str, *args: Any, **kwargs: Any) -> PreparedSplit:
    """A :class:`~lightning_dino.data.prepared.split.PreparedSplit`, once LitData is there.

    Raises:
        MissingExtraError: If LitData (the ``streaming`` extra) is not installed.
    """
    require("litdata", _PURPOSE)
    from lightning_dino.data.prepared.split import PreparedSplit

    return PreparedSplit(input_dir, *args, **kwargs)


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
        self.dataset = prepared_split(input_dir, cache_dir=cache_dir, fix=fix)
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
        return fix_advice(self.root, self.source)

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
        return prepared_split(
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
    return require("litdata", _PURPOSE).StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn or default_collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )


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
            downloader = require("litdata.streaming.downloader", _PURPOSE).get_downloader
            downloader(root, local_dir, []).download_file(path, local)
        except Exception as err:  # each storage client raises its own errors
            raise FileNotFoundError(f"{missing} ({type(err).__name__}: {err})") from err
        with open(local) as file:
            return json.load(file)
