"""A seeded, epoch-indexed sampler and a DataLoader that resume in the middle of an epoch.

Lightning restores the loop counters of a run killed mid-epoch, but a plain shuffled
``DataLoader`` starts the interrupted epoch again from a fresh random order, so the resumed run
sees other images than the uninterrupted one would have. :class:`ResumableDataLoader` implements
the ``state_dict`` / ``load_state_dict`` interface that Lightning stores in every checkpoint (under
``loops.fit_loop.state_dict.combined_loader``) and loads before it iterates the resumed epoch, and
its :class:`EpochSampler` skips the samples already consumed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_dino.seeding import rank_seed
from lightning_dino.setting_names import setting

_STATE_VERSION = 1


class EpochSampler(DistributedSampler):
    """Shuffle by ``(seed, epoch)``, shard across ranks, and start an epoch part-way through.

    Epoch ``e`` visits ``randperm(N, seed + e)`` (or ``0..N-1`` without shuffling), the same
    order on every rank, truncated to ``(N // num_replicas) * num_replicas`` samples so every rank
    gets ``N // num_replicas`` of them. Rank ``r`` takes positions ``r, r + num_replicas, ...`` of
    what is left after ``start``: so after ``k`` batches of ``b`` samples on every rank the ranks
    together have consumed exactly the first ``k * b * num_replicas`` positions, and ``b`` samples
    per rank on ``num_replicas`` ranks see the same images per step as ``b * num_replicas`` on one.

    It subclasses :class:`~torch.utils.data.distributed.DistributedSampler`, so Lightning keeps it
    instead of injecting its own; Lightning calls :meth:`set_epoch` at every epoch start. Iterating
    again without :meth:`set_epoch` moves to the next epoch, like a shuffled ``DataLoader``.

    Args:
        dataset: The dataset sampled (only its length is used).
        num_replicas: Number of processes the data is split over.
        rank: This process's rank in ``[0, num_replicas)``.
        shuffle: Shuffle every epoch; False visits the samples in order.
        seed: Seed of the shuffles, the same on every rank.

    Attributes:
        start: Positions of the current epoch's order to skip (samples already consumed by all
            ranks together); applies to the next iteration only.
        iteration_epoch: Epoch of the most recent iteration (None before the first).
        iteration_start: ``start`` of the most recent iteration.

    Examples:
        >>> list(EpochSampler(range(10), num_replicas=2, rank=1, shuffle=False))
        [1, 3, 5, 7, 9]
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.start = 0
        self.iteration_epoch: int | None = None
        self.iteration_start = 0
        self._epoch_used = False
        self._tag: Callable[[int, int, int], int] | None = None
        self._batch_size = 1

    def tag_batches(self, tag: Callable[[int, int, int], int], batch_size: int) -> None:
        """Yield ``(index, tag(seed, epoch, step))`` pairs: the step's tag with each index.

        The step of a rank's sample is its batch's position in the epoch, the same on every
        rank (a size mix draws each step's crop sizes from it).

        Args:
            tag: ``(seed, epoch, step) -> tag``.
            batch_size: Samples per batch on each rank.
        """
        self._tag, self._batch_size = tag, batch_size

    @classmethod
    def for_trainer(
        cls,
        dataset: Sized,
        trainer: pl.Trainer | None,
        previous: EpochSampler | None = None,
        shuffle: bool = True,
    ) -> EpochSampler:
        """A sampler for this process of ``trainer``, seeded by ``seed_everything``.

        Args:
            dataset: The dataset sampled.
            trainer: The trainer whose ``world_size`` and ``global_rank`` shard the data; None
                for a single process.
            previous: The sampler of an earlier loader over the same data; returned (with its
                epoch) when it shards the same way, so a new loader does not restart at epoch 0.
            shuffle: Shuffle every epoch.

        Returns:
            The sampler; a new one is seeded with ``PL_GLOBAL_SEED`` (set by
            ``seed_everything``), else 0.
        """
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        layout = (dataset, replicas, rank, shuffle)
        if previous is not None:
            if (previous.dataset, previous.num_replicas, previous.rank, previous.shuffle) == layout:
                return previous
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return cls(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)

    @property
    def used_size(self) -> int:
        """Samples of an epoch that are visited: ``num_samples * num_replicas``."""
        return self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration; a different epoch starts at its beginning.

        Args:
            epoch: Zero-based epoch index.
        """
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch
        self._epoch_used = False

    def order(self, epoch: int) -> torch.Tensor:
        """The visiting order of ``epoch`` over all ranks.

        Args:
            epoch: Zero-based epoch index.

        Returns:
            int64 dataset indices, shape (used_size,).
        """
        if not self.shuffle:
            return torch.arange(self.used_size)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator)[: self.used_size]  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        """Yield this rank's indices from ``start`` to the end of the epoch (tagged, or not)."""
        if self._epoch_used:  # iterated again without set_epoch: next epoch
            self.epoch += 1
            self.start = 0
        self._epoch_used = True
        start = min(self.start, self.used_size)
        self.start = 0
        self.iteration_epoch, self.iteration_start = self.epoch, start
        stop = start + (self.used_size - start) // self.num_replicas * self.num_replicas
        indices = self.order(self.epoch)[start + self.rank : stop : self.num_replicas].tolist()
        if self._tag is None:
            return iter(indices)
        first = start // (self._batch_size * self.num_replicas)  # steps already taken
        tags = {}
        for step in range(first, first + len(indices) // self._batch_size + 1):
            tags[step] = self._tag(self.seed, self.epoch, step)
        return iter(
            (index, tags[first + i // self._batch_size]) for i, index in enumerate(indices)
        )

    def __len__(self) -> int:
        """Indices per rank in a whole epoch (an epoch resumed part-way yields fewer)."""
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch is saved in checkpoints and restored.

    Use it with an :class:`EpochSampler`. It counts the batches it hands out, so its
    :meth:`state_dict` is exact whatever the worker prefetching; Lightning saves that state with
    the fit loop and calls :meth:`load_state_dict` before it iterates the resumed epoch, and
    treats the loader as resumable (no "your dataloader is not resumable" warning).

    The underlying iterator is created at the first ``next()``, after Lightning's ``set_epoch``
    (Lightning calls ``iter()`` on a resumed run before ``set_epoch``, which would otherwise make
    worker processes prefetch the wrong epoch). Worker seeds come from the loader's own
    ``generator`` reseeded per epoch from (seed, epoch, global rank)
    (:func:`~lightning_dino.seeding.rank_seed`), so ranks draw different augmentations and
    iterating does not consume the global random state.

    Args:
        dataset: Map-style dataset.
        batch_size: Samples per batch.
        sampler: An :class:`EpochSampler`; another sampler makes this a plain ``DataLoader``
            whose state is empty (Lightning may swap samplers, e.g. for ``overfit_batches``).
        **kwargs: Other ``DataLoader`` arguments (``drop_last``, ``num_workers``...).

    Examples:
        >>> sampler = EpochSampler(range(10), shuffle=False)
        >>> loader = ResumableDataLoader(range(10), batch_size=2, sampler=sampler)
        >>> next(iter(loader))
        tensor([0, 1])
        >>> loader.state_dict()["start"]  # a resumed run starts the epoch at sample 2
        2
    """

    def __init__(
        self, dataset: Any, batch_size: int | None = 1, sampler: Any = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._batches = 0

    @property
    def samples_per_batch(self) -> int:
        """Samples one batch consumes over all ranks."""
        replicas = self.sampler.num_replicas if isinstance(self.sampler, EpochSampler) else 1
        return (self.batch_size or 1) * replicas

    def __iter__(self) -> Iterator[Any]:
        """A counting iterator that builds the real one at its first ``next()``."""
        return _CountingIterator(self)

    def _underlying_iterator(self) -> Iterator[Any]:
        self._batches = 0
        if isinstance(self.sampler, EpochSampler):
            seed = rank_seed(self.sampler.seed + self.sampler.epoch, self.sampler.rank)
            self.generator.manual_seed(seed)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch stands.

        Returns:
            ``{"version", "epoch", "start", "seed", "num_replicas", "batch_size"}``, ``start``
            being the samples of the epoch consumed by all ranks together; ``{}`` without an
            :class:`EpochSampler`.
        """
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return {}
        if sampler.iteration_epoch is None:  # not iterated yet
            epoch, start = sampler.epoch, sampler.start
        else:
            epoch = sampler.iteration_epoch
            start = sampler.iteration_start + self._batches * self.samples_per_batch
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "start": start,
            "seed": sampler.seed,
            "num_replicas": sampler.num_replicas,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch where it stopped, with the saved seed.

        Args:
            state_dict: A :meth:`state_dict`; ``{}`` does nothing.
        """
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, EpochSampler):
            return
        saved = (state_dict["num_replicas"], state_dict["batch_size"])
        if saved != (sampler.num_replicas, self.batch_size):
            warnings.warn(
                f"resuming with {sampler.num_replicas} process(es) x batch {self.batch_size} "
                f"from a checkpoint written with {saved[0]} x {saved[1]}: the data order "
                "continues where it stopped, but the steps per epoch and every per-step "
                f"schedule change; resume with the same {setting('trainer', 'devices')}, "
                f"{setting('trainer', 'num_nodes')} and {setting('data', 'batch_size')} for an "
                "exact continuation",
                stacklevel=2,
            )
        sampler.seed = state_dict["seed"]
        sampler.set_epoch(state_dict["epoch"])
        sampler.start = state_dict["start"]


class _CountingIterator(Iterator[Any]):
    """Creates the loader's iterator lazily and counts the batches it yields."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._loader._underlying_iterator()
        batch = next(self._iterator)
        self._loader._batches += 1
        return batch

    def __len__(self) -> int:
        return len(self._loader)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), the default workers' budget."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
