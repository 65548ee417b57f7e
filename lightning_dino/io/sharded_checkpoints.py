"""Sharded checkpoints (PyTorch distributed checkpoints) read in one process, and consolidated.

A run sharded with FSDP2 (``--trainer.strategy fsdp2``) writes each checkpoint as a folder: one
file of shards per rank, the shards' index (``.metadata``) and Lightning's ``meta.pt`` (everything
that is not a tensor: hyperparameters, loop state, callbacks'). :func:`read_sharded_checkpoint`
assembles the full weights in one process, without a process group, for ``export``,
``load_backbone``, ``knn`` and ``embed``; :func:`consolidate` writes them as one ``.ckpt`` file
(weights and metadata, no optimizer state) for what reads files only
(``DINO.load_from_checkpoint``). Resuming takes the folder itself, on any number of ranks.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint
SHARDS_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shards
WEIGHTS = "state_dict."


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by a sharded run (its index and ``meta.pt``)."""
    folder = Path(path)
    return (folder / SHARDS_INDEX).is_file() and (folder / METADATA_FILE).is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a sharded checkpoint's weights and metadata in one process (no optimizer state).

    Args:
        path: The checkpoint folder (``last.ckpt/`` of a sharded run).

    Returns:
        A checkpoint dictionary as a single-file one has it: ``state_dict`` (full tensors on the
        CPU), ``hyper_parameters``, ``epoch``, ``global_step``...
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(path)
    checkpoint = torch.load(folder / METADATA_FILE, map_location="cpu", weights_only=True)
    index = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in index.items()
        if key.startswith(WEIGHTS) and isinstance(entry, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(weights, checkpoint_id=str(folder))
    checkpoint["state_dict"] = {key[len(WEIGHTS):]: value for key, value in weights.items()}
    return checkpoint


def consolidate(ckpt: str, out: str) -> Path:
    """Write a sharded checkpoint folder as one .ckpt file (weights and metadata).

    ``lightning-dino consolidate --ckpt runs/x/checkpoints/last.ckpt --out last_full.ckpt``; the
    file loads with ``DINO.load_from_checkpoint`` and every tool. It holds no optimizer state:
    resume from the folder (on any number of ranks), not from the file.

    Args:
        ckpt: The sharded checkpoint folder.
        out: The file to write.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: When ``ckpt`` is not a sharded checkpoint folder.
    """
    if not is_sharded_checkpoint(ckpt):
        raise FileNotFoundError(
            f"--ckpt {ckpt}: not a sharded checkpoint folder (it needs {SHARDS_INDEX} and "
            f"{METADATA_FILE}); a single .ckpt file needs no consolidation"
        )
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(read_sharded_checkpoint(ckpt), target)
    print(f"wrote {target} (weights and metadata of {ckpt}; resume from the folder)")
    return target
