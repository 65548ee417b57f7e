"""DINOv3's phases on the dense benchmark: the DINOv2 parts alone, with a Gram phase, with both.

The DINOv2 parts alone, then with a Gram phase, then with a Gram phase and a high-resolution
phase, at equal CPU time.

Protocol (data, crops, budget accounting and evaluation are ``benchmarks/dense.py``'s; every run
starts from the same initial weights and data order; CPU time counts every phase):

* ``v2_parts``: DINO + iBOT + KoLeo (``dense.py``'s ``ibot_koleo``) for the whole budget B.
* Pre-training, shared by the next two: the same recipe for B / 2 (its own schedule of half the
  steps), saved as a checkpoint.
* ``gram``: then DINOv3's Gram phase for B / 2, as its official config runs it, scaled down: a new
  run from the pre-training teacher (``start_from``), the Gram teacher that teacher
  (``gram_teacher_checkpoint``) seeing its own undistorted 64-px crops of the global boxes
  (``gram_crop_size``, twice the 32-px global crops), the Gram weight ramped from 0 to 2.0 over
  the first tenth, the local crops' DINO term at 0.5, teacher momentum 0.999, the lr 0.6 x the
  pre-training peak (DINOv3: 3e-5 after 5e-5) and constant after a short warmup.
* ``gram_high_res``: the Gram phase for B / 4, then DINOv3's high-resolution adaptation for
  B / 4: a new run from the Gram phase's teacher, the Gram teacher fixed at it with weight 1.5,
  each step drawing one (global, local, Gram) size triple above the pre-training sizes,
  (40, 16, 80) or (48, 24, 96) with probability 1/2 each, no flips, the lr 0.25 x the
  pre-training peak (DINOv3: 1.25e-5 after 5e-5).
* Evaluation: patch-level and image-level weighted k-NN (k=20, T=0.07) of the final teacher, as
  in ``dense.py``.

Outputs: a markdown table on stdout and ``dense_phases.csv`` in ``--out``.

Example:
    python benchmarks/dense_phases.py --out docs  # docs/dinov2.md (about 40 CPU minutes)
    python benchmarks/dense_phases.py --quick --out /tmp/dense  # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense  # benchmarks/ is a folder of scripts, not a package

from lightning_dino import DINO
from lightning_dino.data.batched import BatchedMultiCropTransform
from lightning_dino.data.crops import crop_settings
from lightning_dino.data.size_mix import CropSizeMix

LABELS = {
    "v2_parts": "DINOv2 parts (DINO + iBOT + KoLeo), whole budget",
    "pretrain": "pre-training alone, half the budget",
    "gram": "pre-training, then the Gram phase",
    "gram_high_res": "pre-training, Gram phase, high-resolution phase",
}
GRAM_CROPS = {**dense.CROPS, "gram_crop_size": 64}
HIGH_RES_MIX = [[40, 16, 80, 0.5], [48, 24, 96, 0.5]]


def gram_phase(start: Path, schedule_steps: int, steps_per_epoch: int) -> DINO:
    """The Gram phase from the checkpoint ``start`` (see the module docstring)."""
    return dense.build_model("ibot_koleo", schedule_steps, steps_per_epoch, overrides={
        "start_from": str(start), "gram_teacher_checkpoint": str(start), "gram_loss_weight": 2.0,
        "gram_start_step": 0, "gram_ramp_steps": max(2, schedule_steps // 10),
        "local_loss_weight": 0.5, "momentum_teacher": 0.999, "momentum_teacher_end": 0.999,
        "lr": 0.6 * 0.003, "min_lr": 0.6 * 0.003,
        "warmup_epochs": 0.05 * schedule_steps / steps_per_epoch,
    })


def high_res_phase(start: Path, schedule_steps: int, steps_per_epoch: int) -> DINO:
    """The high-resolution phase from the checkpoint ``start`` (see the module docstring)."""
    return dense.build_model("ibot_koleo", schedule_steps, steps_per_epoch, overrides={
        "start_from": str(start), "gram_teacher_checkpoint": str(start), "gram_loss_weight": 1.5,
        "gram_start_step": 0, "local_loss_weight": 0.5, "momentum_teacher": 0.999,
        "momentum_teacher_end": 0.999, "lr": 0.25 * 0.003, "min_lr": 0.25 * 0.003,
        "warmup_epochs": 0.1 * schedule_steps / steps_per_epoch,
    })


class MixCollate:
    """Batched augmentation whose crop sizes follow a :class:`CropSizeMix`, step by step."""

    def __init__(self, rows: list[list[float]], seed: int) -> None:
        self.mix = CropSizeMix(rows, crop_settings(**{**GRAM_CROPS, "hflip_p": 0.0}))
        self.transforms = [BatchedMultiCropTransform(v) for v in self.mix.variants]
        self.seed, self.step = seed, 0

    def __call__(self, samples: list[tuple[Any, int]]) -> Any:
        tag = self.mix.choice(self.seed, 0, self.step)
        self.step += 1
        return self.transforms[tag].collate(samples)


def save(model: DINO, folder: Path, name: str) -> Path:
    """The run's checkpoint, what the next phase starts from."""
    path = folder / f"{name}.ckpt"
    model.trainer.save_checkpoint(path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-cpu-s", type=float, default=480.0, help="B, CPU s per variant")
    parser.add_argument("--schedule-steps", type=int, default=640, help="the whole run's schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the outputs")
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 2 s budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_cpu_s, args.schedule_steps = 2.0, 8
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print the table and write ``dense_phases.csv``.

    Returns:
        The table rows.
    """
    args = parse_args(argv)
    sizes, mosaics, data = dense.prepare_run(args.quick, args.seed)
    per_epoch = len(mosaics) // sizes.batch_size
    budget, steps, seed = args.budget_cpu_s, args.schedule_steps, args.seed
    folder = Path(tempfile.mkdtemp())

    def phase(model: DINO, share: float, phase_steps: int, **kwargs: Any) -> list[float]:
        """Train one phase for ``share`` of the budget: [steps, CPU s, median ms a step]."""
        return list(dense.train_measured(
            model, mosaics, sizes, share * budget, phase_steps, seed, **kwargs
        ))

    def row(name: str, model: DINO, *phases: list[float]) -> dict[str, Any]:
        """The variant's row: steps and CPU seconds of all its phases, the last phase's ms."""
        steps_, cpu = sum(p[0] for p in phases), sum(p[1] for p in phases)
        return dense.result_row(name, model.teacher.backbone, data, steps_, cpu, phases[-1][2],
                                LABELS)

    pl.seed_everything(seed, verbose=False)
    v2 = dense.build_model("ibot_koleo", steps, per_epoch)
    rows = [row("v2_parts", v2, phase(v2, 1.0, steps))]
    pl.seed_everything(seed, verbose=False)
    pretrain = dense.build_model("ibot_koleo", steps // 2, per_epoch)
    first = phase(pretrain, 0.5, steps // 2)
    rows.append(row("pretrain", pretrain, first))
    pretrained = save(pretrain, folder, "pretrain")

    gram = gram_phase(pretrained, steps // 2, per_epoch)
    rows.append(row("gram", gram, first, phase(gram, 0.5, steps // 2, crops=GRAM_CROPS)))

    short = gram_phase(pretrained, steps // 4, per_epoch)
    second = phase(short, 0.25, steps // 4, crops=GRAM_CROPS)
    high_res = high_res_phase(save(short, folder, "gram"), steps // 4, per_epoch)
    third = phase(high_res, 0.25, steps // 4, collate=MixCollate(HIGH_RES_MIX, seed))
    rows.append(row("gram_high_res", high_res, first, second, third))

    dense.write_csv(rows, args.out / "dense_phases.csv")
    print(dense.markdown_table(rows, LABELS))
    return rows


if __name__ == "__main__":
    main()
