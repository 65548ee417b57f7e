"""``lightning-dino prepare``: write an image folder once as a LitData dataset to stream it.

The prepared directory holds the images' encoded bytes (JPEG, PNG... as found, not decoded
pixels), their labels and the class names, in the layout that
:mod:`lightning_dino.data.prepared.streaming` reads (``--data.dataset streaming``). Its splits
are the ones ``--data.dataset folder`` makes of the same folder: ``FOLDER/train`` and
``FOLDER/val`` when they exist, else the same fixed random ``val_fraction`` of the labelled
images held out for k-NN val.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from lightning_dino.data.image_folders import UNLABELED, find_image_files, hold_out
from lightning_dino.data.prepared.streaming import METADATA_FILENAME, METADATA_VERSION, decode_image
from lightning_dino.data.sampler import available_cpus
from lightning_dino.extras import require
from lightning_dino.setting_names import setting

_MAX_NAMED_FILES = 20  # unreadable files named in the message; all are in the metadata
# Names an argument in messages: --out under `lightning-dino prepare`, else as a Python call.
_setting = functools.partial(setting, "prepare_streaming_dataset")
_PURPOSE = "lightning-dino prepare (streaming datasets)"

Found = list[tuple[str, str | None]]  # (path, top-level class folder or None), from a scan
Sample = tuple[str, int]  # (path, label)


def prepare_streaming_dataset(
    data_dir: Path,
    out: Path,
    overwrite: bool = False,
    val_fraction: float = 0.1,
    skip_corrupt: bool = True,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    progress: bool = True,
) -> dict[str, Any]:
    """Write an image folder as a LitData dataset for --data.dataset streaming.

    Two passes, each in ``num_workers`` processes with a progress bar: every image is decoded
    once to check it, then the readable files' bytes are written unchanged, with their labels,
    by LitData's ``optimize``. Unreadable files (empty, truncated, not an image, above
    ``PIL.Image.MAX_IMAGE_PIXELS``) are left out with one warning naming them, as
    ``--data.dataset folder`` does, or, without ``skip_corrupt``, stop the run before anything
    is written.

    Args:
        data_dir: Image folder, flat or with one subfolder per class (labels), optionally split
            into ``train/`` and ``val/`` subfolders (ImageNet's layout).
        out: Local directory to write (copy it to object storage afterwards to stream from there).
        overwrite: Replace ``out`` if it already holds a prepared dataset.
        val_fraction: Without a ``val/`` subfolder, the fraction of the labelled images held out
            for k-NN val: the same images as ``--data.val_fraction`` holds out of ``folder``;
            0 keeps every image for training.
        skip_corrupt: Leave unreadable files out with a warning instead of stopping.
        num_workers: Processes reading the images; None uses every available CPU.
        chunk_bytes: Target size of LitData's chunk files (e.g. "64MB").
        progress: Show the progress bars (and LitData's messages).

    Returns:
        The metadata written to ``out/lightning_dino.json``: ``version``, ``source``,
        ``classes``, ``splits`` (``{"train": {"size", "labelled"}, "val": {...}}``; no ``val``
        when nothing is held out) and ``skipped`` (``[path, reason]`` pairs).

    Raises:
        FileExistsError: If ``out`` already holds a prepared dataset and ``overwrite`` is False,
            or is not empty and not a prepared dataset.
        FileNotFoundError: If ``data_dir`` holds no image.
        ValueError: If an argument is out of range, or an image is unreadable and
            ``skip_corrupt`` is False, or no image is readable.

    Examples:
        >>> prepare_streaming_dataset("photos/", "prepared/")  # doctest: +SKIP
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{_setting('val_fraction')} must be in [0, 1), got {val_fraction}")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"{_setting('num_workers')} must be >= 1, got {num_workers}")
    require("litdata", _PURPOSE)  # before the folder is scanned
    data_dir, out = Path(data_dir), Path(out)
    layout = scan_layout(data_dir)
    _clear_output(out, overwrite)
    workers = num_workers or available_cpus()
    start = time.perf_counter()
    paths = [path for found in layout.values() for path, _ in found]
    unreadable = check_images(paths, workers, progress)
    _report_unreadable(data_dir, unreadable, skip_corrupt)
    classes, splits = plan_splits(layout, val_fraction, {path for path, _ in unreadable})
    if not splits["train"]:
        raise ValueError(f"none of the training image files under {data_dir} is readable")
    for name, samples in splits.items():
        if samples:
            _write_split(samples, out / name, workers, chunk_bytes, progress)
    seconds = time.perf_counter() - start
    metadata = _metadata(data_dir, classes, splits, unreadable)
    (out / METADATA_FILENAME).write_text(json.dumps(metadata, indent=1))
    sizes = ", ".join(f"{name} {split['size']}" for name, split in metadata["splits"].items())
    print(
        f"prepared {data_dir} into {out} in {seconds:.1f} s ({len(paths) / seconds:.1f} "
        f"images/s): {sizes}, {len(unreadable)} unreadable"
    )
    return metadata


def scan_layout(root: Path) -> dict[str, Found]:
    """The image files of a folder, by split: ``train`` always, ``val`` for a ``val/`` subfolder.

    Args:
        root: The image folder; the ``train`` files are those of ``root/train`` if it exists,
            else of ``root``; ``val`` is ``root/val`` when ``root/train`` exists too.

    Returns:
        ``{"train": found, "val": found}``, each a sorted list of ``(path, folder)`` pairs,
        ``folder`` being the top-level subfolder (the class) or None.

    Raises:
        FileNotFoundError: If a split's folder holds no image.
    """
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        return {"train": find_image_files(root)}
    layout = {"train": find_image_files(train_dir)}
    if val_dir.is_dir():
        layout["val"] = find_image_files(val_dir)
    return layout


def plan_splits(
    layout: dict[str, Found],
    val_fraction: float,
    unreadable: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[str], dict[str, list[Sample]]]:
    """The class names and the ``train`` / ``val`` samples that ``folder`` would use.

    The readable ``train`` files are labelled by their sorted class folders (-1 outside any).
    ``val`` is the labelled files of the ``val`` layout, or, without one, a fixed random
    ``val_fraction`` of the labelled ``train`` files, taken out of ``train`` (the draw of
    ``--data.dataset folder``).

    Args:
        layout: :func:`scan_layout`'s files.
        val_fraction: Fraction of the labelled images held out when there is no ``val``.
        unreadable: Paths to leave out.

    Returns:
        ``(classes, {"train": samples, "val": samples})``: ``(path, label)`` samples in path
        order, the labelled training samples before the unlabelled ones.

    Raises:
        ValueError: If ``val`` has a class folder that ``train`` lacks.
    """
    found = [(path, folder) for path, folder in layout["train"] if path not in unreadable]
    classes = sorted({folder for _, folder in found if folder is not None})
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = [
        (path, UNLABELED if folder is None else class_to_idx[folder]) for path, folder in found
    ]
    if "val" in layout:
        val = _labelled(layout["val"], class_to_idx, unreadable)
        train = samples
    else:
        labelled = [i for i, (_, label) in enumerate(samples) if label != UNLABELED]
        held_out = set(hold_out(labelled, val_fraction))
        val = [samples[i] for i in sorted(held_out)]
        train = [sample for i, sample in enumerate(samples) if i not in held_out]
    train.sort(key=lambda sample: sample[1] == UNLABELED)  # stable: keeps the path order
    return classes, {"train": train, "val": val}


def _labelled(
    found: Found, class_to_idx: dict[str, int], unreadable: set[str] | frozenset[str]
) -> list[Sample]:
    """The readable files of a val split that are in class folders, labelled by ``class_to_idx``."""
    unknown = sorted({folder for _, folder in found if folder not in (None, *class_to_idx)})
    if unknown:
        raise ValueError(
            f"val class folders {unknown} are not among the training classes "
            f"{sorted(class_to_idx)}; every class of the val split must exist in the train split"
        )
    return [
        (path, class_to_idx[folder])
        for path, folder in found
        if folder is not None and path not in unreadable
    ]


def _clear_output(out: Path, overwrite: bool) -> None:
    """Make sure ``out`` is absent or empty, deleting a prepared dataset when told to."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not ((out / METADATA_FILENAME).is_file() or (out / "train").is_dir()):
        raise FileExistsError(
            f"{_setting('out', out)} exists and is not a prepared dataset (no "
            f"{METADATA_FILENAME}); refusing to write into it: choose a new or empty "
            f"{_setting('out')}"
        )
    if not overwrite:
        raise FileExistsError(
            f"{_setting('out', out)} already holds a prepared dataset; pass "
            f"{_setting('overwrite', True)} to replace it, or choose another {_setting('out')}"
        )
    shutil.rmtree(out)


def check_images(
    paths: list[str], num_workers: int, progress: bool = False
) -> list[tuple[str, str]]:
    """Decode every image file once, in parallel, to find the unreadable ones.

    Args:
        paths: Image files.
        num_workers: Processes decoding them (1 decodes in this process).
        progress: Show a progress bar.

    Returns:
        ``(path, reason)`` of each file that :func:`file_problem` rejects, in ``paths`` order.
    """
    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress)
    with bar:
        problems = []
        for path, problem in zip(paths, _map(file_problem, paths, num_workers), strict=True):
            bar.update()
            if problem is not None:
                problems.append((path, problem))
    return problems


def _map(fn: Any, items: list[str], num_workers: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, over ``num_workers`` processes when more than one."""
    if num_workers == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context(_start_method())
    with context.Pool(min(num_workers, len(items))) as pool:
        yield from pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (4 * num_workers))))


def _start_method() -> str:
    """``fork`` where it exists (fast to start; no torch work has run yet), else ``spawn``."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def file_problem(path: str) -> str | None:
    """Why an image file cannot be trained on, or None if it decodes.

    Args:
        path: Image file.

    Returns:
        None if the file decodes to an image of at least one pixel without exceeding
        ``PIL.Image.MAX_IMAGE_PIXELS``, else the reason (``"ExceptionType: message"``).
    """
    try:
        with open(path, "rb") as file, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = decode_image(file.read())
    except Exception as err:  # OSError, PIL's SyntaxError, ValueError, struct.error...
        return f"{type(err).__name__}: {err}"
    if image.numel() == 0:
        return f"zero-size image ({image.shape[-1]}x{image.shape[-2]})"
    return None


def _report_unreadable(root: Path, unreadable: list[tuple[str, str]], skip_corrupt: bool) -> None:
    """Warn once naming the unreadable files, or raise without ``skip_corrupt``."""
    if not unreadable:
        return
    named = "\n".join(f"  {path}: {reason}" for path, reason in unreadable[:_MAX_NAMED_FILES])
    more = len(unreadable) - _MAX_NAMED_FILES
    named += f"\n  ... and {more} more" if more > 0 else ""
    if not skip_corrupt:
        raise ValueError(
            f"{len(unreadable)} unreadable image file(s) under {root}:\n{named}\nfix or delete "
            f"them, or pass {_setting('skip_corrupt', True)} to leave them out"
        )
    warnings.warn(
        f"skipped {len(unreadable)} unreadable image file(s) under {root} (all are listed "
        f"under 'skipped' in {METADATA_FILENAME}):\n{named}",
        stacklevel=3,
    )


def _write_split(
    samples: list[Sample], out: Path, num_workers: int, chunk_bytes: str, progress: bool
) -> None:
    """Write one split's files with LitData, keeping the samples' order."""
    optimize = require("litdata", _PURPOSE).optimize
    optimize(
        fn=encode_sample,
        inputs=[(index, path, label) for index, (path, label) in enumerate(samples)],
        output_dir=str(out),
        chunk_bytes=chunk_bytes,
        num_workers=min(num_workers, len(samples)),
        keep_data_ordered=True,
        reorder_files=False,
        start_method=_start_method(),
        verbose=progress,
    )


def encode_sample(sample: tuple[int, str, int]) -> dict[str, Any]:
    """One sample of a prepared dataset: an image file's bytes, unchanged, and its label.

    Args:
        sample: ``(index, path, label)``: the image's position in its split, its file and its
            label (-1 for none).

    Returns:
        ``{"index": index, "image": bytes, "label": label}``.
    """
    index, path, label = sample
    with open(path, "rb") as file:
        return {"index": index, "image": file.read(), "label": label}


def _metadata(
    root: Path,
    classes: list[str],
    splits: dict[str, list[Sample]],
    unreadable: list[tuple[str, str]],
) -> dict[str, Any]:
    """The content of ``lightning_dino.json``: classes and the sizes of the written splits."""
    sizes = {
        name: {"size": len(samples), "labelled": sum(label != UNLABELED for _, label in samples)}
        for name, samples in splits.items()
        if samples or name == "train"
    }
    return {
        "version": METADATA_VERSION,
        "source": str(root),
        "classes": classes,
        "splits": sizes,
        "skipped": [list(pair) for pair in unreadable],
    }
