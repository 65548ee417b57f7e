"""The paper's collapse study (section 5.3, Figure 7) at small scale, from a config.

Trains four variants of the same run for the same number of steps and records, every step, the
teacher output entropy and the teacher-student KL (the DINO module logs both as diagnostics):

* DINO: centring + sharpening + momentum teacher;
* no centring: ``center_momentum: 1.0`` keeps the centre at 0;
* no sharpening: teacher temperature = student temperature (0.1);
* no momentum: ``momentum_teacher: 0`` and ``momentum_teacher_end: 0``, the teacher is the student.

Writes ``collapse.png`` (entropy and KL per step, one line per variant) and ``collapse.csv`` into
``--out`` and prints each variant's final k-NN top-1. The paper predicts: no centring -> entropy
to 0, no sharpening -> entropy to ln K, both with KL -> 0; no momentum -> collapse.

Example:
    python benchmarks/collapse_study.py --config configs/quickstart.yaml --steps 300 \
        --out runs/collapse_study
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino.cli import train
from lightning_dino.eval.knn import extract_features, knn_accuracy

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VARIANTS: dict[str, list[str]] = {
    "DINO": [],
    "no centring": ["--model.center_momentum=1.0"],
    "no sharpening": ["--model.teacher_temp=0.1", "--model.warmup_teacher_temp=0.1"],
    "no momentum": ["--model.momentum_teacher=0.0", "--model.momentum_teacher_end=0.0"],
}


class DiagnosticsRecorder(Callback):
    """Keeps the per-step diagnostics that ``DINO.training_step`` returns."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs.get("diagnostics")
        if stats is None or "teacher_entropy" not in stats:  # a step the loggers skip
            return
        self.rows.append(
            {
                "step": trainer.global_step,
                "loss": float(outputs["loss"]),
                "teacher_entropy": float(stats["teacher_entropy"]),
                "teacher_student_kl": float(stats["teacher_student_kl"]),
            }
        )


def knn_top1(pl_module: pl.LightningModule, datamodule: pl.LightningDataModule, bank_size: int) -> float:
    bank = extract_features(pl_module.teacher.backbone, datamodule.knn_train_dataloader(), progress=False)
    if bank_size and bank_size < len(bank[1]):
        keep = torch.randperm(len(bank[1]), generator=torch.Generator().manual_seed(0))[:bank_size]
        bank = (bank[0][keep], bank[1][keep])
    queries = extract_features(pl_module.teacher.backbone, datamodule.knn_val_dataloader(), progress=False)
    return knn_accuracy(*bank, *queries)[0]


def run_variant(config: str, steps: int, extra: list[str], out: Path, bank_size: int) -> tuple[list[dict[str, float]], float, int]:
    recorder = DiagnosticsRecorder()
    fixed = ["--trainer.logger=false", f"--trainer.default_root_dir={out}", f"--trainer.max_steps={steps}",
             "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
             "--trainer.log_every_n_steps=1"]
    cli = train(["--config", config, *fixed, *extra], run=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    return recorder.rows, knn_top1(cli.model, cli.datamodule, bank_size), cli.model.hparams.out_dim


def plot(results: dict[str, list[dict[str, float]]], out_dim: int, path: Path) -> None:
    fig, (ax_h, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in results.items():
        steps = [r["step"] for r in rows]
        ax_h.plot(steps, [r["teacher_entropy"] for r in rows], label=name)
        ax_kl.plot(steps, [r["teacher_student_kl"] for r in rows], label=name)
    ax_h.axhline(math.log(out_dim), color="gray", ls="--", lw=0.8, label=f"ln K (K={out_dim})")
    ax_h.set_title("teacher entropy (nats)")
    ax_kl.set_title("KL(teacher || student)")
    for ax in (ax_h, ax_kl):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_h.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bank-size", type=int, default=10000, help="k-NN memory bank subset (0 = all)")
    parser.add_argument("--out", default="runs/collapse_study")
    args, overrides = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, accuracy = {}, {}
    out_dim = 0
    for name, extra in VARIANTS.items():
        print(f"== {name}", flush=True)
        results[name], accuracy[name], out_dim = run_variant(args.config, args.steps, [*overrides, *extra], out, args.bank_size)
        last = results[name][-1]
        print(f"{name}: k-NN top1 {100 * accuracy[name]:.2f}%, final teacher entropy {last['teacher_entropy']:.3f} "
              f"(ln K = {math.log(out_dim):.3f}), KL {last['teacher_student_kl']:.4f}", flush=True)
    with open(out / "collapse.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "step", "loss", "teacher_entropy", "teacher_student_kl"])
        for name, rows in results.items():
            writer.writerows([name, r["step"], r["loss"], r["teacher_entropy"], r["teacher_student_kl"]] for r in rows)
    plot(results, out_dim, out / "collapse.png")
    print("| variant | k-NN top-1 | final entropy | final KL |")
    for name, rows in results.items():
        print(f"| {name} | {100 * accuracy[name]:.2f}% | {rows[-1]['teacher_entropy']:.3f} | {rows[-1]['teacher_student_kl']:.4f} |")


if __name__ == "__main__":
    main()
