"""Checkpoints for exact, crash-safe resumption.

:class:`DINOCheckpoint` is the ``ModelCheckpoint`` that ``lightning-dino fit`` always brings (the
``--checkpoint.*`` keys): it writes every file atomically, refreshes ``last.ckpt`` every few
optimizer steps between the per-epoch checkpoints, refuses to overwrite a good checkpoint with
non-finite weights, and lets ``--ckpt_path last`` find the newest ``last.ckpt`` of the experiment
even though every run logs to a new ``version_N`` folder. :class:`RandomStateCallback` (brought by
the :class:`~lightning_dino.DINO` module itself) stores every process's random number generator
states, so augmentation and stochastic depth continue as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dino.networks.sharding import local
from lightning_dino.seeding import seed_this_rank
from lightning_dino.setting_names import setting
from lightning_dino.training.preemption import StopSignals, TrainingInterrupted

_TEMPORARY_SUFFIX = ".partial"
# A sharded checkpoint folder moved aside while its successor is renamed into place.
_PREVIOUS_SUFFIX = ".previous" + _TEMPORARY_SUFFIX


class DINOCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic writes and a ``last.ckpt`` refreshed every N steps.

    * **Atomic**: each checkpoint (``last.ckpt`` included) is written to a hidden temporary file
      in the same directory, flushed to disk, then renamed over the target with ``os.replace``; a
      run killed while saving leaves the previous file intact (and at worst a stray
      ``.NAME.partial``). Remote paths (``s3://``...) use Lightning's own writer.
    * **Last is last**: with ``save_last``, ``last.ckpt`` is written at every epoch end, also
      when a ``monitor`` saw no improvement (Lightning would then skip it).
    * **Step checkpoints**: with ``save_last``, ``last.ckpt`` is also rewritten every
      ``last_every_n_train_steps`` optimizer steps, so a run killed mid-epoch loses at most
      about that many steps. The refresh skips an epoch's last step, which the epoch-end
      checkpoint covers when one is due. The per-epoch (or per-``every_n_train_steps``) files
      are kept as configured.
    * **Finite guard**: before writing, every floating-point parameter and buffer is checked;
      non-finite weights raise :class:`FloatingPointError` naming the first bad tensor, and the
      last good checkpoint stays as it was.
    * **Signals**: on SIGTERM or SIGINT the running optimizer step finishes, ``last.ckpt`` is
      written at that step (every process agreeing, atomically) and
      :class:`~lightning_dino.training.preemption.TrainingInterrupted` ends the run with exit
      status 143 (SIGTERM) or 130 (SIGINT); ``--ckpt_path last`` continues exactly from there. At an
      epoch's last step the epoch-end checkpoints are written first. A second signal of the
      same kind acts at once.
    * **Torn files**: temporary ``.NAME.partial`` files left by a process killed while writing
      are removed when training starts, from this run's folder and from the folder of the
      checkpoint it resumes.
    * **Finding "last"**: ``fit --ckpt_path last`` with the default ``dirpath`` (the logger's
      ``version_N/checkpoints``) looks in the folders of all versions of the experiment and
      picks the newest ``last.ckpt``, since a resumed run logs to a new version.

    Args:
        *args: Positional arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
        last_every_n_train_steps: Optimizer steps between refreshes of ``last.ckpt``; 0 only
            writes it when another checkpoint is written.
        check_finite: Refuse to write non-finite weights.
        **kwargs: Keyword arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
            (``dirpath``, ``filename``, ``save_last``, ``every_n_epochs``...).

    Raises:
        ValueError: If ``last_every_n_train_steps`` is negative.

    Examples:
        >>> checkpoint = DINOCheckpoint(dirpath="runs/dino/checkpoints", save_last=True,
        ...                             last_every_n_train_steps=1000)
        >>> trainer = pl.Trainer(callbacks=[checkpoint], logger=False)
    """

    def __init__(
        self,
        *args: Any,
        last_every_n_train_steps: int = 500,
        check_finite: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_train_steps < 0:
            raise ValueError(
                f"{setting('checkpoint', 'last_every_n_train_steps')} must be >= 0 (0 disables "
                f"the step refresh of last.ckpt), got {last_every_n_train_steps}"
            )
        self.last_every_n_train_steps = last_every_n_train_steps
        self.check_finite = check_finite
        self._signals = StopSignals()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove torn temporary files and start catching SIGTERM / SIGINT."""
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:
            folders = {self.dirpath, os.path.dirname(str(trainer.ckpt_path or ""))}
            for folder in folders - {None, ""}:
                remove_torn_files(str(folder))
        self._signals.install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop catching signals."""
        super().on_train_end(trainer, pl_module)
        self._signals.restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Stop catching signals (then save, when ``save_on_exception`` asks for it)."""
        self._signals.restore()
        super().on_exception(trainer, pl_module, exception)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save as configured, keep ``last.ckpt`` at the epoch's end, then honour a signal.

        Lightning refreshes ``last.ckpt`` at an epoch's end only when a monitored checkpoint was
        saved too; with ``monitor`` set and no improvement it would stay epochs behind, and
        ``--ckpt_path last`` would lose them. Here it is written at every epoch end.
        """
        super().on_train_epoch_end(trainer, pl_module)
        if (
            self.save_last is True
            and self._last_global_step_saved != trainer.global_step
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
            and self._should_save_on_train_epoch_end(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._stop_if_signalled(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Save as configured, then refresh ``last.ckpt`` when a step refresh is due."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.last_every_n_train_steps
        if (
            every > 0
            and self.save_last
            and trainer.global_step % every == 0
            and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` at this step and end the run if any process got a signal."""
        signum = self._signals.agreed(trainer)
        if signum is None:
            return
        candidates = self._monitor_candidates(trainer)
        path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        if self.last_model_path != path or self._last_global_step_saved != trainer.global_step:
            self.last_model_path = path
            self._save_checkpoint(trainer, path)
        rank_zero_warn(
            f"{signal.Signals(signum).name} received: saved {path} at step "
            f"{trainer.global_step}; resume with {setting('Trainer.fit', 'ckpt_path', path)}"
        )
        raise TrainingInterrupted(signum, path)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Write ``filepath`` through a temporary file in its directory and ``os.replace``."""
        if self.check_finite:
            _check_finite(trainer, filepath, self._last_checkpoint_saved)
        if not _is_local(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        temporary = _temporary_path(filepath)
        trainer.save_checkpoint(temporary, self.save_weights_only)
        if trainer.is_global_zero:
            _replace(temporary, filepath)
        trainer.strategy.barrier("DINOCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: point ``linkpath`` at ``filepath`` with an atomic rename."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = _temporary_path(linkpath)
            if os.path.lexists(temporary):
                os.remove(temporary)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            _replace(temporary, linkpath)
        trainer.strategy.barrier()

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """``last*.ckpt`` of this run's folder, else of every version of the experiment."""
        found = super()._find_last_checkpoints(trainer)
        if found or self.dirpath is not None or not trainer.loggers:
            return found
        logger = trainer.loggers[0]
        experiment = Path(logger.save_dir or trainer.default_root_dir, str(logger.name))
        pattern = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-\d+)?$")
        return {
            os.path.normpath(path)
            for path in experiment.glob(f"*/checkpoints/*{self.FILE_EXTENSION}")
            if pattern.match(path.stem)
        }


class RandomStateCallback(Callback):
    """Give every process its own random streams; save and restore them in checkpoints.

    At the start of ``fit`` each rank but rank 0 reseeds its generators from the run's seed
    and its global rank (:func:`~lightning_dino.seeding.seed_this_rank`), so ranks draw different
    crops, jitter, iBOT masks and stochastic depth even after ``seed_everything`` seeded them
    alike. Stores the torch (CPU and CUDA), Python ``random`` and NumPy generator states of each
    rank (gathered to rank 0, which writes the checkpoint), as tensors and tuples that
    ``torch.load(weights_only=True)`` accepts. A resumed run sets them back in
    ``on_train_start``, after Lightning has built the data iterator and just before the first
    batch is drawn, which is where the interrupted run stood when it saved. With
    ``num_workers=0`` this makes augmentation and stochastic depth continue exactly; DataLoader
    worker processes have their own generators, which start afresh.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[RandomStateCallback()], logger=False)
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's random states, in rank order (a collective call under DDP).

        Returns:
            ``{"ranks": [states of rank 0, states of rank 1, ...]}``.
        """
        local = collect_random_states()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {"ranks": [local]}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return {"ranks": gathered}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed this rank's generators from (seed, rank); a resumed run restores them later."""
        seed_this_rank(trainer.global_rank)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved states until training starts."""
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore this rank's saved states, if a checkpoint was loaded."""
        if not self._pending:
            return
        states, self._pending = self._pending, None
        if trainer.global_rank >= len(states):
            rank_zero_warn(
                f"the checkpoint holds random states of {len(states)} process(es) but this run "
                f"has {trainer.world_size}; ranks without saved states keep their seeds"
            )
            return
        set_random_states(states[trainer.global_rank])


def collect_random_states() -> dict[str, Any]:
    """This process's random generator states, in types ``weights_only`` loading accepts.

    Returns:
        ``{"torch": uint8 tensor, "python": tuple, "numpy": tuple}`` plus ``"cuda"`` (a list
        of uint8 tensors) when CUDA is initialised.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore states from :func:`collect_random_states`.

    Args:
        states: The saved states; CUDA states are restored when the device count matches.
    """
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _check_finite(trainer: pl.Trainer, filepath: str, last_saved: str) -> None:
    """Raise if a floating-point parameter or buffer of the module is NaN or infinite."""
    module = trainer.lightning_module
    tensors = [
        (name, tensor)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_floating_point() and tensor.numel() > 0
    ]
    if not tensors:
        return
    # A sharded module: each rank checks its own slices, and the ranks decide together.
    norms = torch._foreach_norm([local(tensor.detach()).float() for _, tensor in tensors])
    finite = bool(torch.stack(norms).isfinite().all())
    if trainer.strategy.reduce_boolean_decision(finite, all=True):
        return
    bad = next((name for (name, tensor) in tensors
                if not bool(local(tensor.detach()).isfinite().all())), "a tensor of another rank")
    kept = f"the last checkpoint ({last_saved}) is kept" if last_saved else "nothing was saved"
    raise FloatingPointError(
        f"not writing {filepath}: {bad} is NaN or infinite at global step "
        f"{trainer.global_step}, epoch {trainer.current_epoch}; {kept}. Likely fixes: "
        f"{non_finite_fixes(module)}; resume from the kept checkpoint with "
        f"{setting('Trainer.fit', 'ckpt_path')}."
    )


def non_finite_fixes(owner: object = "model") -> str:
    """The usual fixes of a run whose loss or weights became NaN or infinite, for messages.

    Args:
        owner: The method module, to name its settings.
    """
    return (
        f"{setting('trainer', 'precision', 'bf16-mixed')} or 32 instead of 16-mixed, a lower "
        f"{setting(owner, 'lr')}, a lower {setting(owner, 'teacher_temp')}, or a smaller "
        f"{setting(owner, 'clip_grad')}"
    )


def remove_torn_files(folder: str) -> list[str]:
    """Delete the temporary ``.NAME.partial`` files an interrupted write left in ``folder``.

    Args:
        folder: A checkpoint folder (remote or missing folders are skipped).

    Returns:
        The paths removed.
    """
    if not _is_local(folder) or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder), key=lambda n: not n.endswith(_PREVIOUS_SUFFIX)):
        if not (name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX)):
            continue
        path = os.path.join(folder, name)
        original = os.path.join(folder, name[1 : -len(_PREVIOUS_SUFFIX)])
        if name.endswith(_PREVIOUS_SUFFIX) and not os.path.exists(original):
            os.replace(path, original)  # killed between the two renames: the old one is whole
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # a sharded checkpoint's folder
            else:
                os.remove(path)
            removed.append(path)
    return removed


def _is_local(path: str) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _temporary_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_TEMPORARY_SUFFIX}")


def _replace(source: str, target: str) -> None:
    """Move ``source`` onto ``target`` atomically, after flushing a file's bytes to disk."""
    if os.path.isfile(source) and not os.path.islink(source):
        with open(source, "rb") as file:
            os.fsync(file.fileno())
    previous = None
    if os.path.isdir(target) and not os.path.islink(target):  # sharded checkpoints are folders
        directory, name = os.path.split(target)  # os.replace cannot replace a folder: move the
        previous = os.path.join(directory, f".{name}{_PREVIOUS_SUFFIX}")  # old one aside first
        os.replace(target, previous)
    os.replace(source, target)
    if previous is not None:
        shutil.rmtree(previous)
    with contextlib.suppress(OSError):  # make the rename durable where directories can be synced
        directory = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def check_finite_loss(module: pl.LightningModule, loss: torch.Tensor) -> None:
    """Stop every process together when the loss is not finite, naming the step and the fixes.

    Decided together, so that every process stops (one process raising alone would leave the
    others waiting in the next collective).

    Args:
        module: The module training (its trainer, step and epoch).
        loss: This step's total loss.

    Raises:
        FloatingPointError: If the loss is NaN or infinite on any process.
    """
    trainer = module.trainer
    if not trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
        raise FloatingPointError(
            f"non-finite {type(module).__name__} loss (here {loss.item()}) at global step "
            f"{module.global_step}, epoch {module.current_epoch}. Likely fixes: "
            f"{non_finite_fixes(module)}. The last checkpoint written before this step is intact."
        )
