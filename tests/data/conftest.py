"""Shared helpers for the data tests: tiny image files written to tmp_path."""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def single_thread():
    """Run like a DataLoader worker (one intra-op thread): faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encode_image(size=(12, 10), mode="RGB", fmt="PNG", seed=0) -> bytes:
    """Encode a random image of ``size`` (width, height) and ``mode`` as ``fmt`` bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Write a random image to a path, creating parent folders; returns the path."""

    def write(path: Path, size=(12, 10), mode="RGB", fmt=None, seed=0) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = fmt or Image.registered_extensions()[path.suffix.lower()]
        path.write_bytes(encode_image(size, mode, fmt, seed))
        return path

    return write


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _write_fashion_mnist(directory: Path, n_train=20, n_test=10, gz=True, seed=0):
    """Write small random Fashion-MNIST-like idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.fixture
def write_idx() -> Callable[[Path, np.ndarray], None]:
    """Write a uint8 array as an idx file (gzipped for a .gz name)."""
    return _write_idx


@pytest.fixture
def write_fashion_mnist() -> Callable[..., dict]:
    """Write small random Fashion-MNIST idx files into a directory; returns the arrays."""
    return _write_fashion_mnist
