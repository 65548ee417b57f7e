"""Random streams per process: every rank of a distributed run draws its own random numbers.

``seed_everything(0)`` seeds every process alike, and torch's default generators start from one
fixed seed when nothing seeds them, so without care every rank of a run would draw the same crop
boxes, colour jitter, iBOT masks and stochastic-depth masks: an ``n``-th of the augmentation
diversity on ``n`` devices. Each process's generators are seeded from (seed, global rank) at the
start of ``fit`` (:class:`~lightning_dino.training.checkpointing.RandomStateCallback`), and data
loader workers from (seed, global rank, epoch) and their worker id; steps advance the streams,
and checkpoints save and restore each rank's state.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

_UINT64 = (1 << 64) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams in a run seeded with ``seed``.

    Rank 0 keeps ``seed`` itself, so a one-process run draws what it always drew; every other
    rank gets an independent 32-bit seed from NumPy's ``SeedSequence`` of ``(seed, rank)``.

    Args:
        seed: The run's seed.
        rank: The global rank.

    Returns:
        A seed in ``[0, 2**32)`` (``seed`` itself for rank 0).
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed & _UINT64, rank]).generate_state(1)[0])


def seed_this_rank(rank: int) -> int | None:
    """Give this process's generators (torch CPU and CUDA, Python, NumPy) their rank's seed.

    The run's seed is ``seed_everything``'s (``PL_GLOBAL_SEED``), else torch's initial seed.
    Rank 0 is left as it is.

    Args:
        rank: This process's global rank.

    Returns:
        The seed set, or None on rank 0.
    """
    if rank == 0:
        return None
    base = os.environ.get("PL_GLOBAL_SEED")
    seed = rank_seed(int(base) if base is not None else torch.initial_seed(), rank)
    torch.manual_seed(seed)  # every CUDA device too
    random.seed(seed)
    np.random.seed(seed)
    return seed
