"""Small training monitors the DINO module brings by default: throughput and a crop grid."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from lightning_dino.training.preflight import crops_of


class ThroughputLogger(Callback):
    """Logs ``train/images_per_sec``: images (not crops) per second per device, per batch.

    The time between consecutive ``on_train_batch_start`` calls covers data loading, forward,
    backward, optimizer and EMA, i.e. what a user waits for.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[ThroughputLogger()], logger=False)
    """

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Do not count the pause between epochs."""
        self._last = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log the rate of the previous batch."""
        now = time.perf_counter()
        if self._last is not None:
            images = crops_of(batch)[0].shape[0]
            pl_module.log(
                "train/images_per_sec", images / max(now - self._last, 1e-9), batch_size=images
            )
        self._last = now


class CropGridLogger(Callback):
    """Logs the crops of the first training batch as an image grid to TensorBoard, once.

    One row per sample (up to ``n_samples``): its global crops then its local crops, each
    resized to the global crop size, de-normalised with the data module's ``mean``/``std`` when
    it has them.

    Args:
        n_samples: Number of samples shown.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[CropGridLogger(n_samples=8)])
    """

    def __init__(self, n_samples: int = 4) -> None:
        self.n_samples = n_samples
        self._done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Write the grid for the first batch on rank zero."""
        if self._done:
            return
        self._done = True
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        grid = crop_grid(crops_of(batch), self.n_samples, *_mean_std(trainer))
        loggers[0].experiment.add_image("train/crops", grid, global_step=trainer.global_step)


def _mean_std(trainer: pl.Trainer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    hparams = getattr(trainer.datamodule, "hparams", {})
    return tuple(hparams.get("mean", (0.0,) * 3)), tuple(hparams.get("std", (1.0,) * 3))


@torch.no_grad()
def crop_grid(
    crops: list[torch.Tensor],
    n_samples: int,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Arrange the crops of the first ``n_samples`` samples in a grid, one row per sample.

    Args:
        crops: Crop-major list of (B, C, H_i, W_i) tensors.
        n_samples: Rows of the grid.
        mean: Per-channel mean used to normalise the crops.
        std: Per-channel std used to normalise the crops.

    Returns:
        A (3, H_grid, W_grid) float image in [0, 1].
    """
    size = crops[0].shape[-2:]
    n = min(n_samples, crops[0].shape[0])
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    tiles = []
    for i in range(n):
        for crop in crops:
            tile = crop[i : i + 1].detach().float().cpu() * std_t + mean_t
            tiles.append(torch.nn.functional.interpolate(tile, size=size, mode="nearest"))
    return make_grid(torch.cat(tiles).clamp(0, 1), nrow=len(crops), padding=1)
