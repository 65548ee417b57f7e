"""Shared fixtures: tiny DINO models and multi-crop batches that run in a second on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    """LightningCLI reads sys.argv when given no arguments, and warns when pytest's flags are there."""
    monkeypatch.setattr(sys, "argv", ["lightning-dino"])


@pytest.fixture
def in_tmp_path(monkeypatch, tmp_path):
    """The test runs in tmp_path, so a run's config.yaml and logs land there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _checkout_stays_clean():
    """A test that writes into the checkout's top folder (a run's config.yaml, runs/) fails."""
    before = set(os.listdir(REPO))
    yield
    written = sorted(set(os.listdir(REPO)) - before)
    assert not written, f"the test wrote {written} into {REPO}: write under tmp_path (monkeypatch.chdir)"

TINY_VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
}


class RandomCrops(Dataset):
    """n samples of [2 global (3, g, g)] + [n_local (3, l, l)] random crops and a label."""

    def __init__(self, n: int = 16, n_local: int = 2, global_size: int = 32, local_size: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.globals = torch.randn(n, 2, 3, global_size, global_size, generator=gen)
        self.locals = torch.randn(n, n_local, 3, local_size, local_size, generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return [*self.globals[i], *self.locals[i]], self.labels[i]


class CropData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4, **kwargs):
        super().__init__()
        self.batch_size = batch_size
        self.dataset = RandomCrops(**kwargs)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


@pytest.fixture
def tiny_vit_kwargs():
    return dict(TINY_VIT)


def make_trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_epochs": 1,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def _gloo_worker(rank: int, world_size: int, init_file: str, fn, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn, tmp_path, world_size: int = 2) -> list:
    """Run ``fn(rank)`` in ``world_size`` gloo processes on the CPU; return each rank's result.

    ``fn`` must be a module-level function (the processes are spawned and import it by name).
    """
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(world_size, str(tmp_path / "init"), fn, results), nprocs=world_size, join=True)
    return [results[rank] for rank in range(world_size)]
