"""GPU training throughput, peak memory and MFU of the DINO module (ViT-S/16 by default).

Drives :class:`~lightning_dino.DINO` with a Lightning ``Trainer`` (``bf16-mixed`` by default)
for each per-device batch size in ``--batch-sizes`` until one does not fit, and prints images/s,
peak GPU memory and the model FLOPs utilisation: achieved FLOP/s over the card's dense bf16
peak. FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``:
3x the student forward (forward + backward) plus the teacher forward on the global crops.

Inputs are either random crops already on the GPU (``--data synthetic``: the model alone) or
the real pipeline (``--data pipeline``): :class:`~lightning_dino.data.MultiCropDataModule` on
generated images with DataLoader workers and the chosen ``--augmentation``.

``--dry-run`` swaps in a tiny ViT, small crops and two steps, so it runs on a CPU in seconds
(``--device cpu --dry-run``): a smoke test of the script, not a measurement.

Examples:
    python benchmarks/gpu_throughput.py --batch-sizes 64 128 256
    python benchmarks/gpu_throughput.py --data pipeline --augmentation batched --batch-sizes 128
    python benchmarks/gpu_throughput.py --device cpu --dry-run
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py, a sibling script
from throughput import (
    CropData,
    PeakMemory,
    StepTimer,
    autocast_for,
    lightning_trainer,
    random_crops,
)

from lightning_dino import DINO
from lightning_dino.data import MultiCropDataModule

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by a substring of the device name.
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]

TINY = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``--peak-tflops``, else looked up by name."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_step(module: DINO, crops: list[torch.Tensor], precision: str) -> tuple[int, int]:
    """``(student_forward, teacher_forward)`` FLOPs of one step on ``crops``.

    The training step costs about ``3 * student_forward + teacher_forward`` (the backward pass
    is twice the forward).
    """
    device = crops[0].device
    counts = []
    for network, inputs in ((module.student, crops), (module.teacher, crops[:2])):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), autocast_for(precision, device):
            network(inputs)
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the DINO module."""
    # Steady state: the last layer trains (no freeze epoch); the lr value does not matter.
    steady = {"compile": args.compile, "freeze_last_layer": 0, "warmup_epochs": 0}
    if args.dry_run:
        return {**TINY, **steady}
    return {"backbone": args.model, "out_dim": args.out_dim, **steady}


def data_settings(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Keyword arguments of the data module (sizes, counts; generated images for the pipeline)."""
    source: dict[str, Any] = (
        {"dataset": "folder", "data_dir": str(args.photos), "val_fraction": 0.0}
        if args.photos
        else {
            "dataset": "synthetic",
            "synthetic_size": max(args.synthetic_images, 2 * batch_size),
            "synthetic_image_size": args.image_size,
        }
    )
    return {
        **source,
        "batch_size": batch_size,
        "num_workers": args.workers,
        "global_crop_size": args.global_size,
        "local_crop_size": args.local_size,
        "n_local_crops": args.n_local,
        "augmentation": args.augmentation,
    }


def run_batch_size(
    args: argparse.Namespace, device: torch.device, batch_size: int, root: str
) -> dict[str, float]:
    """Train ``warmup + steps`` steps at one batch size; returns images/s, memory, FLOPs."""
    torch.manual_seed(0)
    settings = model_settings(args)
    data = data_settings(args, batch_size)
    crops = random_crops(data, device, n_batches=2)
    eager = DINO(**{**settings, "compile": False}).to(device)  # FlopCounterMode needs eager
    student_flops, teacher_flops = flops_per_step(eager, crops[0], args.precision)
    del eager
    module = DINO(**settings)
    if args.data == "synthetic":
        datamodule: pl.LightningDataModule = CropData(crops, args.warmup + args.steps)
    else:
        del crops
        datamodule = MultiCropDataModule(**data)
    timer = StepTimer(args.warmup)
    memory = PeakMemory(device)
    memory.reset()
    trainer = lightning_trainer(device, args.precision, args.warmup + args.steps, 50, root, [timer])
    trainer.fit(module, datamodule=datamodule)
    memory.read()
    rate = timer.images_per_second(batch_size)
    return {
        "images_per_second": rate,
        "peak_memory": memory.peak,
        "flops_per_image": (3 * student_flops + teacher_flops) / batch_size,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm backbone")
    parser.add_argument("--out-dim", type=int, default=65536, help="prototypes K")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--precision", default="bf16-mixed", help="bf16-mixed or 32-true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per batch size")
    parser.add_argument("--data", choices=["synthetic", "pipeline"], default="synthetic")
    parser.add_argument(
        "--augmentation", choices=["per_sample", "batched", "device", "auto"], default="per_sample"
    )
    parser.add_argument(
        "--photos", default=None, help="pipeline: a folder of photographs (benchmarks/photos.py)"
    )
    parser.add_argument("--workers", type=int, default=None, help="loader workers (pipeline)")
    parser.add_argument("--image-size", type=int, default=256, help="generated image side")
    parser.add_argument("--synthetic-images", type=int, default=1024, help="generated images")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps (smoke test)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch_sizes, args.steps, args.warmup = [4], 2, 1
        args.global_size, args.local_size, args.n_local = 32, 16, 2
        args.image_size, args.synthetic_images, args.workers = 32, 16, 0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*(warmup|does not have many workers).*")
    device = torch.device(args.device)
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = TINY["backbone"] + " (tiny, dry run)" if args.dry_run else args.model
    inputs = (
        "random crops on the device"
        if args.data == "synthetic"
        else (
            f"MultiCropDataModule, {args.augmentation} augmentation of {args.image_size}-px images"
        )
    )
    print(
        f"{name}: {model}, {args.precision}, 2x{args.global_size} + "
        f"{args.n_local}x{args.local_size} crops, {inputs}; peak "
        f"{'unknown (pass --peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as root:
        for batch_size in args.batch_sizes:
            try:
                result = run_batch_size(args, device, batch_size, root)
            except torch.cuda.OutOfMemoryError:
                print(f"batch {batch_size}: out of memory; larger batches not tried", flush=True)
                break
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            achieved = result["images_per_second"] * result["flops_per_image"]
            mfu = "n/a" if peak is None else f"{100 * achieved / peak:.1f}%"
            print(
                f"batch {batch_size}: {result['images_per_second']:.1f} img/s, "
                f"{PeakMemory.label(device)} {result['peak_memory'] / 2**30:.2f} GiB, "
                f"{result['flops_per_image'] / 1e9:.3g} GFLOP/image, "
                f"{achieved / 1e12:.1f} TFLOP/s, MFU {mfu}",
                flush=True,
            )


if __name__ == "__main__":
    main()
