"""Where the time of one DINO training step goes, on random crops shaped like a config's.

Runs the module's step by hand under ``torch.profiler`` with one labelled region per part
(teacher forward, student forward, loss, collapse diagnostics, backward, clip, optimizer, EMA)
and prints milliseconds per step for each region, then the most expensive operators. With
``--lightning`` it instead trains the module with a Lightning ``Trainer(profiler="simple")``
for the same number of steps and prints Lightning's per-hook times (the bookkeeping around the
step: logging, callbacks, hooks).

Examples:
    python benchmarks/profile_step.py --config configs/quickstart.yaml
    python benchmarks/profile_step.py --config configs/quickstart.yaml --lightning
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py, a sibling script
from throughput import CropData, autocast_for, random_crops, read_config

from lightning_dino import DINO
from lightning_dino.eval.diagnostics import collapse_statistics, teacher_entropy_ratio
from lightning_dino.training.ema import ema_update
from lightning_dino.training.optimization import clip_gradients_per_tensor, parameter_groups

REGIONS = [
    "teacher forward",
    "student forward",
    "loss",
    "diagnostics (full)",
    "entropy ratio only",
    "backward",
    "clip",
    "optimizer",
    "ema",
]


def profile_regions(
    module: DINO, crops: list[torch.Tensor], steps: int, precision: str
) -> torch.profiler.profile:
    """Profile ``steps`` hand-written steps of the module, one ``record_function`` per region."""
    device = crops[0].device
    optimizer = torch.optim.AdamW(parameter_groups(module.student), lr=1e-4, fused=True)
    params = list(module.student.parameters())
    hp = module.hparams

    def step() -> None:
        with autocast_for(precision, device):
            with record_function("teacher forward"), torch.no_grad():
                teacher_out = module.teacher(crops[:2])
            with record_function("student forward"):
                student_out = module.student(crops)
            with record_function("loss"):
                loss = module.loss(student_out, teacher_out, hp.teacher_temp)
        with record_function("diagnostics (full)"):
            collapse_statistics(
                student_out, teacher_out, module.loss.center, hp.student_temp, hp.teacher_temp
            )
        with record_function("entropy ratio only"):
            teacher_entropy_ratio(teacher_out, module.loss.center, hp.teacher_temp)
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            clip_gradients_per_tensor(params, hp.clip_grad)
        with record_function("optimizer"):
            optimizer.step()
            module.loss.update_center()
        with record_function("ema"):
            ema_update(module.teacher, module.student, 0.996)

    module.train()
    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
    return profiler


def print_regions(profiler: torch.profiler.profile, steps: int) -> None:
    """Milliseconds per step of each region (CPU wall time of the region, GPU time if any)."""
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if event.key in REGIONS:
            totals[event.key] += event.cpu_time_total / 1000 / steps
    step_total = sum(v for k, v in totals.items() if k != "entropy ratio only")
    print(f"{'region':<22}{'ms/step':>10}{'share':>8}")
    for region in REGIONS:
        share = totals[region] / step_total
        print(f"{region:<22}{totals[region]:>10.1f}{100 * share:>7.1f}%")
    print(f"{'sum (without ratio)':<22}{step_total:>10.1f}")


def profile_lightning(module: DINO, crops: list[torch.Tensor], steps: int, precision: str) -> None:
    """Train ``steps`` steps with Lightning's simple profiler and print its report."""
    device = crops[0].device
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_steps=steps,
            log_every_n_steps=20,
            default_root_dir=root,
            profiler="simple",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=CropData([crops], steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a lightning-dino fit YAML")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--lightning", action="store_true", help="Lightning's per-hook profile")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    sections = read_config(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = DINO(**sections["model"])
    crops = random_crops(sections["data"], device, n_batches=1)[0]
    if args.lightning:
        profile_lightning(module, crops, args.steps, args.precision)
        return
    profiler = profile_regions(module.to(device), crops, args.steps, args.precision)
    print_regions(profiler, args.steps)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
