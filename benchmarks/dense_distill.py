"""Distillation on the dense benchmark: a distilled small ViT against the same ViT from scratch.

A small ViT distilled from a ViT teacher (features objective, pooled and patch-map terms) is
compared with the same small ViT trained with DINO + iBOT from scratch, at equal CPU time, on the
Fashion-MNIST mosaics of ``benchmarks/dense.py``.

Protocol (data, crops, budget accounting and evaluation are ``benchmarks/dense.py``'s):

* Teacher. ``dense.py``'s ViT (4-px patches, 4 blocks of width 96) trained with DINO + iBOT for
  ``--teacher-budget-cpu-s`` CPU seconds (its ``ibot`` variant), then frozen.
* Student. A smaller ViT: 4-px patches, 2 blocks of width 64, 2 heads (about a quarter of the
  teacher's compute per image).
* Variants, each from the same initial student weights and data order, each until its process
  CPU time reaches ``--budget-cpu-s`` (the teacher's forward passes count against the
  distilled student's budget): ``random_init``; ``scratch``: DINO + iBOT with ``dense.py``'s
  recipe; ``distilled``: ``lightning_dino.Distillation(objective="features")`` with the trained
  teacher backbone as an ``nn.Module``, on the two global crops (no local crops: this objective
  does not use them), evaluated through its student EMA.
* Evaluation: patch-level and image-level weighted k-NN (k=20, T=0.07) as in ``dense.py``, for
  the teacher and every student variant.

Outputs: a markdown table on stdout and ``dense_distill.csv`` in ``--out``.

Example:
    python benchmarks/dense_distill.py --out docs  # docs/distillation.md (about 25 CPU minutes)
    python benchmarks/dense_distill.py --quick --out /tmp/dense  # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense  # benchmarks/ is a folder of scripts, not a package

from lightning_dino import Distillation

STUDENT_KWARGS = {**dense.BACKBONE_KWARGS, "depth": 2, "embed_dim": 64, "num_heads": 2}
GLOBAL_ONLY = {**dense.CROPS, "n_local_crops": 0}
LABELS = {
    "teacher": "teacher: ViT 4 x 96, DINO + iBOT",
    "random_init": "student ViT 2 x 64, random init",
    "scratch": "student, DINO + iBOT from scratch",
    "distilled": "student, distilled (features objective)",
}


def build_distilled(teacher: nn.Module, schedule_steps: int, steps_per_epoch: int) -> Distillation:
    """The student distilled from ``teacher`` (features objective, pooled + patch-map terms)."""
    return Distillation(
        teacher=teacher,
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=STUDENT_KWARGS,
        objective="features",
        ema_momentum=0.99,
        lr=0.003,
        min_lr=1e-5,
        warmup_epochs=0.1 * schedule_steps / steps_per_epoch,
        monitors=False,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-budget-cpu-s", type=float, default=480.0)
    parser.add_argument("--teacher-schedule-steps", type=int, default=640)
    parser.add_argument("--budget-cpu-s", type=float, default=300.0, help="CPU s per student")
    parser.add_argument("--schedule-steps", type=int, default=800, help="students' schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the outputs")
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 1 s budgets")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_budget_cpu_s = args.budget_cpu_s = 1.0
        args.teacher_schedule_steps = args.schedule_steps = 6
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print the table and write ``dense_distill.csv``.

    Returns:
        The table rows.
    """
    args = parse_args(argv)
    sizes, mosaics, data = dense.prepare_run(args.quick, args.seed)
    steps_per_epoch = len(mosaics) // sizes.batch_size

    pl.seed_everything(args.seed, verbose=False)
    teacher = dense.build_model("ibot", args.teacher_schedule_steps, steps_per_epoch)
    run = dense.train_measured(
        teacher, mosaics, sizes, args.teacher_budget_cpu_s, args.teacher_schedule_steps, args.seed
    )
    rows = [dense.result_row("teacher", teacher.teacher.backbone, data, *run, LABELS)]

    pl.seed_everything(args.seed, verbose=False)
    scratch = dense.build_model("ibot", args.schedule_steps, steps_per_epoch, STUDENT_KWARGS)
    initial = {k: v.clone() for k, v in scratch.student.backbone.state_dict().items()}
    untrained = (0, 0.0, float("nan"))
    rows.append(dense.result_row("random_init", scratch.teacher.backbone, data, *untrained, LABELS))
    run = dense.train_measured(
        scratch, mosaics, sizes, args.budget_cpu_s, args.schedule_steps, args.seed
    )
    rows.append(dense.result_row("scratch", scratch.teacher.backbone, data, *run, LABELS))

    distilled = build_distilled(teacher.teacher.backbone, args.schedule_steps, steps_per_epoch)
    distilled.student.backbone.load_state_dict(initial)  # the scratch student's initial weights
    distilled.ema.backbone.load_state_dict(initial)
    run = dense.train_measured(
        distilled, mosaics, sizes, args.budget_cpu_s, args.schedule_steps, args.seed, GLOBAL_ONLY
    )
    rows.append(dense.result_row("distilled", distilled.ema.backbone, data, *run, LABELS))

    dense.write_csv(rows, args.out / "dense_distill.csv")
    print(dense.markdown_table(rows, LABELS))
    return rows


if __name__ == "__main__":
    main()
