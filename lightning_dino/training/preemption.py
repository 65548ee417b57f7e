"""Stopping a run on SIGTERM / SIGINT at a step boundary, with a checkpoint, as schedulers expect.

Clouds, Kubernetes and most batch schedulers send SIGTERM some seconds before they kill a job;
Ctrl-C sends SIGINT. :class:`StopSignals` turns the first of either into a request that the
checkpoint callback (:class:`~lightning_dino.training.checkpointing.DINOCheckpoint`) honours
at the end of the running optimizer step: it writes ``last.ckpt`` at that step and raises
:class:`TrainingInterrupted`, so the process exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT) instead of 0. A second signal of the same kind is passed to the handler that was there
before (Ctrl-C twice interrupts at once). SIGUSR1 (SLURM's requeue signal) is left to Lightning.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_dino.setting_names import setting

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving; the exit status is ``128 + signum``.

    Args:
        signum: The signal that asked the run to stop.
        checkpoint: Where the run was saved.

    Examples:
        >>> try:  # doctest: +SKIP
        ...     trainer.fit(model, data)
        ... except TrainingInterrupted as stop:  # SIGTERM or SIGUSR1: last.ckpt is written
        ...     sys.exit(stop.code)  # 128 + signum, as a killed process would report
    """

    def __init__(self, signum: int, checkpoint: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint
        # Worded now, in the caller's naming style (lightning_dino.setting_names), not when printed.
        resume = setting("Trainer.fit", "ckpt_path", checkpoint)
        self._message = f"stopped on {signal.Signals(signum).name}; resume with {resume}"

    def __str__(self) -> str:
        return self._message


class StopSignals:
    """Record SIGTERM and SIGINT instead of dying, while installed.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread,
    some launchers) :meth:`install` does nothing and signals behave as before.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Replace the SIGTERM and SIGINT handlers; :meth:`restore` puts the old ones back."""
        self.received = None
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def agreed(self, trainer: pl.Trainer) -> int | None:
        """The signal to stop on if any process received one (a collective call under DDP).

        Args:
            trainer: The trainer whose processes must agree.

        Returns:
            The signal number (the largest one received by any process), or None.
        """
        local = self.received or 0
        if trainer.world_size > 1:
            flag = torch.tensor(local, device=trainer.strategy.root_device)
            local = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return local or None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # asked twice: act as if we were not here
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.received = signum
