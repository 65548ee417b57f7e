"""``lightning-dino benchmark``: what a recipe does on this device, before a long run is started.

A short run of the recipe (its model, crop sizes, precision and strategy; ``--model.*``,
``--data.*`` and ``--trainer.*`` override it as for ``fit``) on random crops of the recipe's
sizes, or with ``--real-data`` on the recipe's own data pipeline, printing images/s and the time
of a step after a warm-up, the peak memory of a device (the GPU allocator's peak; on a CPU the
process's resident memory), the model FLOPs of an image (counted once, forward and backward, by
``torch.utils.flop_counter``) and the model FLOPs utilisation against the device's dense bf16
peak (:data:`PEAK_BF16_FLOPS`; other devices print FLOP/s only). ``--find-batch-size`` doubles
the per-device batch until a run does not fit (out of memory, or above ``--memory-limit-gib``)
and reports the largest that does; ``--compare-checkpointing`` then runs the largest again with
``--model.activation_checkpointing true`` and prints the memory it saves and the speed it costs.

Examples:
    lightning-dino benchmark --config dinov3_vits16 --trainer.devices 1
    lightning-dino benchmark --config quickstart --find-batch-size --memory-limit-gib 8
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_dino.data.crops import CROP_SETTINGS, DEFAULT_CROPS
from lightning_dino.training.preflight import check_crop_sizes

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by a substring of the device's name.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


class OutOfMemory(Exception):
    """A batch does not fit: the device ran out of memory or the run passed the memory limit."""


@dataclass
class Measurement:
    """What one batch size gave.

    Attributes:
        batch_size: Images per device.
        devices: Devices of the run (its world size).
        images_per_second: Images per second of all devices together after the warm-up.
        step_seconds: Seconds per optimizer step after the warm-up.
        peak_memory: Peak bytes of one device (GPU allocator) or of the process (CPU RSS).
        flops_per_image: Model FLOPs of one image's training step (forward and backward).
        device: The device it ran on.
    """

    batch_size: int
    devices: int
    images_per_second: float
    step_seconds: float
    peak_memory: int
    flops_per_image: float
    device: torch.device

    def line(self, peak: float | None) -> str:
        """One printed line: throughput, step time, memory, FLOPs, FLOP/s and MFU (per device)."""
        achieved = self.images_per_second / self.devices * self.flops_per_image
        mfu = "" if peak is None else f", MFU {100 * achieved / peak:.1f}%"
        memory = "peak GPU memory" if self.device.type == "cuda" else "peak process memory"
        devices = f" x {self.devices} devices" if self.devices > 1 else ""
        return (
            f"batch {self.batch_size}{devices}: {self.images_per_second:.1f} images/s, "
            f"{1000 * self.step_seconds:.0f} ms/step, {memory} {self.peak_memory / 2**30:.2f} GiB, "
            f"{self.flops_per_image / 1e9:.3g} GFLOP/image, {achieved / 1e12:.3g} TFLOP/s"
            f"{' per device' if self.devices > 1 else ''}{mfu}"
        )


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops``, else looked up by its name."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class RandomCrops(Dataset):
    """``length`` training batches of random crops shaped as a recipe's (``batch_size=None``)."""

    def __init__(self, data: dict[str, Any], length: int) -> None:
        generator = torch.Generator().manual_seed(0)
        batch, sizes = int(data["batch_size"]), crop_sizes(data)
        self.crops = [torch.randn(batch, 3, s, s, generator=generator) for s in sizes["crops"]]
        self.gram = [torch.randn(batch, 3, s, s, generator=generator) for s in sizes["gram"]]
        self.labels = torch.zeros(batch, dtype=torch.int64)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if self.gram:
            return {"crops": self.crops, "gram_crops": self.gram, "labels": self.labels}
        return self.crops, self.labels


class RandomCropData(pl.LightningDataModule):
    """Serves :class:`RandomCrops`; ``batch_size`` is what the module scales the lr by."""

    def __init__(self, data: dict[str, Any], length: int) -> None:
        super().__init__()
        self.dataset = RandomCrops(data, length)
        self.batch_size = int(data["batch_size"])

    def train_dataloader(self) -> DataLoader:
        """The pre-built batches, no workers."""
        return DataLoader(self.dataset, batch_size=None)


def crop_sizes(data: dict[str, Any]) -> dict[str, list[int]]:
    """The crops of a batch: sizes of the student's crops and of the Gram crops.

    With a crop-size mix, its largest global size (the one that needs the most memory).
    """
    setting = {key: data.get(key, getattr(DEFAULT_CROPS, key)) for key in CROP_SETTINGS}
    global_size, local_size, gram = (setting["global_crop_size"], setting["local_crop_size"],
                                      setting["gram_crop_size"])
    if data.get("crop_size_mix"):
        global_size, local_size, gram, _ = max(data["crop_size_mix"], key=lambda row: row[0])
    return {
        "crops": [int(global_size)] * setting["n_global_crops"]
        + [int(local_size)] * setting["n_local_crops"],
        "gram": [int(gram)] * setting["n_global_crops"] if gram else [],
    }


class StepClock(Callback):
    """Times the steps after ``warmup`` and keeps the peak memory of the run (all ranks' largest).

    A run past the memory limit stops at the end of its step on every rank alike (``over``).
    """

    def __init__(self, warmup: int, device: torch.device, limit: float | None) -> None:
        self.warmup, self.device, self.limit = warmup, device, limit
        self.times: list[float] = []
        self.peak = 0
        self.over = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the memory region."""
        reset_peak_memory(self.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the time; stop the run once it passes the memory limit."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        local = torch.tensor(float(peak_memory(self.device)), device=self.device)
        self.peak = max(self.peak, int(trainer.strategy.reduce(local, reduce_op="max")))
        if trainer.is_global_zero and sys.stdout.isatty():  # a progress line, rewritten in place
            end = "\n" if trainer.global_step >= trainer.max_steps else ""
            print(f"\r  step {trainer.global_step}/{trainer.max_steps}", end=end, flush=True)
        if self.limit is not None and self.peak > self.limit:
            self.over = trainer.should_stop = True

    def step_seconds(self) -> float:
        """Mean seconds per step over the timed steps."""
        timed = self.times[self.warmup - 1 :] if self.warmup else self.times
        return (timed[-1] - timed[0]) / max(1, len(timed) - 1)


def reset_peak_memory(device: torch.device) -> None:
    """Start a memory region: the CUDA allocator's peak, or the process's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # hand freed heap back, then restart the kernel's high-water mark (Linux)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak_memory`: GPU allocator, or process RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_limit(device: torch.device, limit_gib: float | None) -> float | None:
    """Bytes a run may peak at: ``limit_gib``, else a default.

    On a CPU the default is 80% of the machine's memory (a run above it would swap or be killed);
    on a GPU there is none (the allocator's out-of-memory error ends the run).
    """
    if limit_gib is not None:
        return limit_gib * 2**30
    if device.type == "cuda":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def flops_per_image(module: pl.LightningModule, data: dict[str, Any], precision: str) -> float:
    """Model FLOPs of one image's training step, forward and backward, counted on the CPU once.

    Two images (KoLeo and BatchNorm need two) through the method's own step, and back; model
    FLOPs, so without the recomputation of activation checkpointing.
    """
    small = RandomCrops({**data, "batch_size": 2}, 1)[0]
    crops, extra = (small["crops"], {"gram": small["gram_crops"]}) if isinstance(small, dict) else (
        small[0], {})
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in str(precision))
    counter = FlopCounterMode(display=False)
    checkpointed = [m for m in module.modules() if getattr(m, "grad_checkpointing", False) is True]
    for child in checkpointed:
        child.grad_checkpointing = False
    try:
        with counter, autocast, torch.compiler.set_stance("force_eager"):
            module.compute_step(crops, extra).loss.backward()
    finally:
        for child in checkpointed:
            child.grad_checkpointing = True
    module.zero_grad(set_to_none=True)
    for child in module.modules():  # leave no accumulated centre statistics behind
        if hasattr(child, "reset_center"):
            child.reset_center()
    return counter.get_total_flops() / 2


def measure(config: str, overrides: list[str], batch_size: int, args: argparse.Namespace,
            root: str, build: Callable[..., Any]) -> Measurement:
    """One short run of the recipe at ``batch_size`` images per device.

    ``build`` is :func:`lightning_dino.cli.train` (handed down: the command line imports this
    module, not the other way round).
    """
    fixed = [f"--data.batch_size={batch_size}", f"--trainer.max_steps={args.warmup + args.steps}",
             "--trainer.max_epochs=-1", "--trainer.logger=false", "--trainer.callbacks=[]",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             f"--trainer.default_root_dir={root}", f"--checkpoint.dirpath={root}/checkpoints"]
    with warnings.catch_warnings():  # "args and sys.argv": this command's own argv, on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build(["--config", config, *overrides, *fixed], run=False)
    model, trainer = cli.model, cli.trainer
    data = dict(cli.datamodule.hparams)
    check_crop_sizes(model, data)  # before any work: a crop size the backbone cannot take
    model.schedule_warnings = list  # a run of a few steps is shorter than every warm-up
    device = trainer.strategy.root_device
    flops = flops_per_image(model, data, trainer.precision)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    limit = memory_limit(device, args.memory_limit_gib)
    clock = StepClock(args.warmup, device, limit)
    trainer.callbacks.append(clock)
    length = args.warmup + args.steps
    datamodule = cli.datamodule if args.real_data else RandomCropData(data, length)
    try:
        trainer.fit(model, datamodule)
    except torch.OutOfMemoryError as err:
        raise OutOfMemory(str(err).splitlines()[0]) from err
    if clock.over:
        raise OutOfMemory(f"peak {clock.peak / 2**30:.2f} GiB, above the limit")
    seconds, devices = clock.step_seconds(), trainer.world_size
    return Measurement(batch_size, devices, batch_size * devices / seconds, seconds, clock.peak,
                       flops, device)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; the rest are ``fit``'s (``--model.*``, ``--data.*``...)."""
    parser = argparse.ArgumentParser(
        prog="lightning-dino benchmark", description=__doc__.split("\n\n")[0],
        epilog="Other flags are fit's: --model.*, --data.*, --trainer.* override the recipe.",
    )
    parser.add_argument("--config", required=True, help="a recipe name or a fit YAML file")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timing")
    parser.add_argument("--real-data", action="store_true", help="the recipe's data pipeline")
    parser.add_argument("--find-batch-size", action="store_true",
                        help="double the per-device batch until it does not fit")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="then the largest batch again with activation checkpointing")
    parser.add_argument("--max-batch-size", type=int, default=8192,
                        help="--find-batch-size stops here (per device)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="a batch above this peak memory does not fit (default on a CPU: 80%% "
                        "of the machine's memory; on a GPU: what the GPU holds)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU on a device not in the table")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    return args, overrides


def main(argv: list[str], build: Callable[..., Any]) -> list[Measurement]:
    """Run the benchmark; print a line per batch size (and the largest that fits).

    Args:
        argv: The command's arguments (``--config``, its own flags, ``fit``'s overrides).
        build: :func:`lightning_dino.cli.train`, which builds model, data and trainer.

    Returns:
        The measurements, one per batch size that fits (then, with
        ``--compare-checkpointing``, the largest batch's with activation checkpointing).
    """
    args, overrides = parse_args(list(argv))
    from lightning_dino.recipes import resolve_config

    for name in ("lightning.pytorch", "lightning.fabric"):  # devices, seeds, tips: not figures
        logging.getLogger(name).setLevel(logging.WARNING)
    config = resolve_config(args.config)
    if not Path(config).is_file():
        raise FileNotFoundError(
            f"--config {args.config}: no such file or packaged recipe (`lightning-dino configs` "
            "lists the recipes)"
        )
    batch = _recipe_batch_size(config, overrides)
    with tempfile.TemporaryDirectory() as root:
        results = _grow(config, overrides, batch, args, root, build)
        if args.find_batch_size:
            say(f"largest batch that fits: {results[-1].batch_size} per device")
        if args.compare_checkpointing:
            on = [*overrides, "--model.activation_checkpointing=true"]
            checkpointed = _measure_line(config, on, results[-1].batch_size, args, root, build)
            results.append(checkpointed)
            say(checkpointing_line(results[-2], checkpointed))
    return results


def _grow(config: str, overrides: list[str], batch: int, args: argparse.Namespace,
          root: str, build: Callable[..., Any]) -> list[Measurement]:
    """Measure ``batch``; with ``--find-batch-size``, double it until it does not fit."""
    results: list[Measurement] = []
    while True:
        try:
            results.append(_measure_line(config, overrides, batch, args, root, build))
        except OutOfMemory as err:
            if not results:
                raise OutOfMemory(
                    f"--data.batch_size={batch} does not fit ({err}); lower --data.batch_size "
                    "(or --data.n_local_crops, the crop sizes), or pass "
                    "--model.activation_checkpointing true"
                ) from err
            say(f"batch {batch}: does not fit ({err})")
            return results
        if not args.find_batch_size:
            return results
        if 2 * batch > args.max_batch_size:
            say(f"batch {2 * batch}: not tried (--max-batch-size {args.max_batch_size})")
            return results
        batch *= 2


def _measure_line(config: str, overrides: list[str], batch: int, args: argparse.Namespace,
                  root: str, build: Callable[..., Any]) -> Measurement:
    """:func:`measure`, announced and printed, with the device memory freed after it."""
    say(f"batch {batch}: {args.warmup} warm-up + {args.steps} timed steps ...")
    try:
        result = measure(config, overrides, batch, args, root, build)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    say(result.line(peak_flops(result.device, args.peak_tflops)))
    return result


def checkpointing_line(plain: Measurement, checkpointed: Measurement) -> str:
    """What activation checkpointing saves at one batch size, and what it costs."""
    change = checkpointed.peak_memory / plain.peak_memory - 1
    return (
        f"activation checkpointing at batch {plain.batch_size}: peak memory "
        f"{plain.peak_memory / 2**30:.2f} -> {checkpointed.peak_memory / 2**30:.2f} GiB "
        f"({100 * change:+.0f}%), "
        f"{checkpointed.images_per_second / plain.images_per_second:.2f}x the images/s"
    )


def say(text: str) -> None:
    """Print on the first process only (each rank of a multi-device run runs the benchmark)."""
    if rank_zero_only.rank == 0:
        print(text, flush=True)


def _recipe_batch_size(config: str, overrides: list[str]) -> int:
    """The per-device batch the recipe (and ``--data.batch_size``) sets."""
    import yaml

    batch = (yaml.safe_load(Path(config).read_text()) or {}).get("data", {}).get("batch_size")
    for position, flag in enumerate(overrides):
        key, has_value, value = flag.partition("=")
        if key == "--data.batch_size":
            batch = value if has_value else overrides[position + 1]
    return int(batch or 64)

