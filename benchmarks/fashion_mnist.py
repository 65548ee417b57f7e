"""k-NN accuracy versus training minutes for a config, against raw pixels and random init.

Runs ``lightning-dino fit`` for a config under a wall-clock budget, pauses every
``--eval-every`` minutes of training to measure the teacher backbone's weighted k-NN (k=20,
T=0.07, cosine; train split as the memory bank, test split as queries), and writes
``curve.csv`` and ``curve.png`` into ``--out``. The evaluation time is not counted as training
time. The first point (minute 0) is the backbone at random initialisation; raw-pixel k-NN is
computed in the same run.

Example:
    python benchmarks/fashion_mnist.py --config configs/quickstart.yaml --minutes 10 \
        --eval-every 2.5 --out runs/bench_quickstart
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import Distillation
from lightning_dino.cli import train
from lightning_dino.eval import AttentionMapMonitor, KNNMonitor
from lightning_dino.eval.knn import evaluated_backbone, extract_features, knn_accuracy

matplotlib.use("Agg")
import matplotlib.pyplot as plt


class TimedKNN(Callback):
    """Evaluates k-NN every few training minutes and stops training at the budget."""

    def __init__(self, every_minutes: float, budget_minutes: float, clock: Any = time.perf_counter) -> None:
        self.every = every_minutes * 60
        self.budget = budget_minutes * 60
        self.clock = clock
        self.rows: list[dict[str, float]] = []
        self._trained = 0.0
        self._last: float | None = None
        self._next_eval = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)
        self._next_eval = self.every
        self._last = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        self._trained += now - self._last
        if self._trained >= self.budget:
            trainer.should_stop = True
        elif self._trained >= self._next_eval:
            self._evaluate(trainer, pl_module)
            self._next_eval += self.every
        self._last = self.clock()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        backbone = evaluated_backbone(pl_module)  # DINO's teacher, a distillation's student EMA
        bank = extract_features(backbone, data.knn_train_dataloader(), progress=False)
        queries = extract_features(backbone, data.knn_val_dataloader(), progress=False)
        top1, top5 = knn_accuracy(*bank, *queries)
        row = {
            "minutes": self._trained / 60,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "top1": top1,
            "top5": top5,
        }
        self.rows.append(row)
        print(
            f"[{row['minutes']:6.2f} min, epoch {row['epoch']}, step {row['step']}] "
            f"k-NN top1 {100 * top1:.2f}%  top5 {100 * top5:.2f}%",
            flush=True,
        )


def raw_pixel_knn(datamodule: pl.LightningDataModule) -> float:
    """k-NN top-1 on the flattened evaluation images (the same normalised pixels the model sees)."""

    def flat(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*((x.flatten(1), y) for x, y in loader), strict=True)
        return torch.cat(xs), torch.cat(ys)

    return knn_accuracy(
        *flat(datamodule.knn_train_dataloader()), *flat(datamodule.knn_val_dataloader())
    )[0]


def write_outputs(
    rows: list[dict[str, float]],
    raw: float,
    out: Path,
    title: str,
    label: str = "DINO teacher",
    initial: str = "random init",
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["minutes"] for r in rows], [100 * r["top1"] for r in rows], "o-", label=label)
    ax.axhline(100 * raw, color="gray", ls="--", label=f"raw pixels ({100 * raw:.1f}%)")
    ax.axhline(100 * rows[0]["top1"], color="red", ls=":", label=f"{initial} ({100 * rows[0]['top1']:.1f}%)")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a lightning-dino fit YAML config")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget")
    parser.add_argument("--eval-every", type=float, default=2.5, help="minutes between k-NN evals")
    parser.add_argument("--out", default="runs/fashion_mnist_benchmark", help="output folder")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="budget in wall-clock minutes, or in this process's CPU minutes (one "
                        "thread, no loader workers: other load on the machine does not count)")
    args, overrides = parser.parse_known_args()  # the rest are fit flags, e.g. --model.lr=0.001

    clock = time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)
        overrides = [*overrides, "--data.num_workers=0"]
        clock = time.process_time
    timer = TimedKNN(args.eval_every, args.minutes, clock)
    fixed = ["--trainer.logger=false", f"--trainer.default_root_dir={args.out}"]
    cli = train(["--config", args.config, *fixed, *overrides], run=False)
    # The config's own evaluation callbacks would run inside the timed training; this script
    # evaluates on its own clock instead.
    cli.trainer.callbacks[:] = [
        c for c in cli.trainer.callbacks if not isinstance(c, KNNMonitor | AttentionMapMonitor)
    ]
    cli.trainer.callbacks.append(timer)
    cli.datamodule.setup("fit")
    raw = raw_pixel_knn(cli.datamodule)
    cli.trainer.fit(cli.model, cli.datamodule)
    label = "distilled student (EMA)" if isinstance(cli.model, Distillation) else "DINO teacher"
    started = any(flag.startswith("--model.start_from") for flag in overrides)
    initial = "start weights" if started else "random init"
    write_outputs(timer.rows, raw, Path(args.out), Path(args.config).stem, label, initial)
    final, init = timer.rows[-1], timer.rows[0]
    print(
        f"final k-NN top1 {100 * final['top1']:.2f}% after {final['minutes']:.1f} min "
        f"(epoch {final['epoch']}, step {final['step']}) | raw pixels {100 * raw:.2f}% | "
        f"{initial} (minute 0) {100 * init['top1']:.2f}% | curve: {args.out}/curve.png"
    )


if __name__ == "__main__":
    main()
