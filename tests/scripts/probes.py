"""Callbacks that tests add to `lightning-dino fit` subprocesses with
``--trainer.callbacks+=tests.scripts.probes.NAME`` (the repository root on PYTHONPATH)."""

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino.networks.sharding import full_state_dict


class DumpState(Callback):
    """Record each step's loss and batch fingerprint; at the end write this rank's state to
    ``out_dir/rank{R}.pt``: student, teacher, centre, losses, logged (synced) losses, batches."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        crops, labels = batch
        self.rows.append({
            "step": trainer.global_step,
            "loss": outputs["loss"].detach().clone(),
            "logged_loss": trainer.callback_metrics["train/loss"].detach().clone(),
            "labels": labels.detach().clone(),
            "crop_sums": torch.stack([c.detach().double().sum(dim=(1, 2, 3)) for c in crops]),
        })

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "student": full_state_dict(pl_module.student),
            "teacher": full_state_dict(pl_module.teacher),
            "center": getattr(getattr(pl_module, "loss", None), "center", torch.zeros(1)).detach().clone(),
            "centers": {k: v.detach().clone() for k, v in pl_module.named_buffers() if k.endswith("center")},
            "ema": full_state_dict(getattr(pl_module, "ema", torch.nn.Module())),
            "rows": self.rows,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


class KillAtStep(Callback):
    """SIGKILL this process when the batch after optimizer step ``step`` starts, i.e. after the
    checkpoints of step ``step`` were written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Send ``signum`` (SIGTERM by default) to this process when the batch after optimizer step
    ``step`` starts: the signal arrives in the middle of step ``step + 1``. With ``rank`` only that
    process signals itself (a scheduler that signals one rank of a distributed run)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int | None = None):
        self.step = step
        self.signum = signum
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class DumpStateFromStart(DumpState):
    """:class:`DumpState` that also writes, when training starts, this rank's student, teacher
    and centre to ``out_dir/start_rank{R}.pt``, so tests can compare how far a run moved them."""

    def on_train_start(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "student": full_state_dict(pl_module.student),
            "teacher": full_state_dict(pl_module.teacher),
            "center": pl_module.loss.center.detach().clone(),
        }
        torch.save(state, self.out_dir / f"start_rank{trainer.global_rank}.pt")
