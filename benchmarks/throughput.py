"""Training images/s of the DINO module against a per-view baseline and a bare PyTorch loop.

In one process, on the same pre-generated random crops (shaped like the config's: batch size,
global and local crop counts and sizes) and from the same initial weights, it measures:

(a) ``lightning``: the :class:`~lightning_dino.DINO` module driven by a Lightning ``Trainer`` with
    the device's fast settings (``--precision auto``: ``bf16-mixed`` on CUDA, ``32-true`` on a
    CPU) and everything a real run does per step: TensorBoard logging every
    ``log_every_n_steps``, the module's callbacks (teacher EMA, collapse monitor, throughput
    log), schedules, per-tensor clipping, fused AdamW;
(b) ``per-view``: the common example-code pattern, same networks and loss in fp32: teacher on
    each global crop separately, student backbone and head on each crop separately, plain
    ``torch.optim.AdamW``, the reference's per-parameter clip (one ``.item()`` each) and a Python
    per-parameter EMA loop;
(c) ``bare loop``: a hand-written PyTorch loop with the grouped forward and the same fast
    settings as (a), without Lightning, logging or diagnostics (the overhead floor).

The three run interleaved inside one Lightning fit: after every ``--steps`` Lightning steps a
callback pauses the fit and runs ``--steps`` steps of (b) and of (c), so load from other
processes hits all three alike; ratios are the median of the per-round ratios (many short
rounds resist bursts of load on a shared machine; ``--threads 1`` resists oversubscription).
Then it measures the config's ``train_dataloader()`` alone (default workers) and an end-to-end
fit of (a) on it.

The last line reads ``a/b=<ratio> a/c=<ratio>``.

Examples:
    python benchmarks/throughput.py --config configs/quickstart.yaml
    python benchmarks/throughput.py --config configs/quickstart.yaml --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_dino.benchmark import peak_memory, reset_peak_memory
from lightning_dino.data import MultiCropDataModule
from lightning_dino.dino import DINO
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.networks.backbones import MultiCropNetwork
from lightning_dino.training.ema import ema_update
from lightning_dino.training.optimization import clip_gradients_per_tensor, parameter_groups

_MOMENTUM = 0.996
_TEACHER_TEMP = 0.04


# Configuration ------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, dict[str, Any]]:
    """The ``model``, ``data`` and ``trainer`` sections of a LightningCLI YAML (init_args or plain).

    Args:
        path: The YAML file.

    Returns:
        ``{"model": {...}, "data": {...}, "trainer": {...}}``.
    """
    config = yaml.safe_load(path.read_text()) or {}
    sections = {}
    for name in ("model", "data", "trainer"):
        section = config.get(name) or {}
        sections[name] = dict(section.get("init_args", section))
    return sections


def data_setting(data: dict[str, Any], key: str) -> Any:
    """A data setting from the config, else the ``MultiCropDataModule`` default."""
    if key in data:
        return data[key]
    return inspect.signature(MultiCropDataModule.__init__).parameters[key].default


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, trainer: dict[str, Any]) -> str:
    """``auto``: the config's precision, else ``bf16-mixed`` on CUDA and ``32-true`` on a CPU.

    On CPUs without AMX, bf16 autocast is slower than fp32 for small convnets (3x slower for
    the quickstart ResNet on an AVX-512 EPYC), so the CPU default is fp32.
    """
    if precision != "auto":
        return precision
    if "precision" in trainer:
        return str(trainer["precision"])
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of a Lightning precision flag (``32-true`` or ``bf16-mixed``)."""
    if precision in ("32", "32-true"):
        return nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"--precision {precision!r}: this benchmark supports 32-true and bf16-mixed")


def random_crops(
    data: dict[str, Any], device: torch.device, n_batches: int, seed: int = 0
) -> list[list[Tensor]]:
    """``n_batches`` crop lists shaped like the config's batches, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    batch = int(data_setting(data, "batch_size"))
    shapes = [int(data_setting(data, "global_crop_size"))] * int(
        data_setting(data, "n_global_crops")
    ) + [int(data_setting(data, "local_crop_size"))] * int(data_setting(data, "n_local_crops"))
    return [
        [torch.randn(batch, 3, s, s, generator=generator).to(device) for s in shapes]
        for _ in range(n_batches)
    ]


# Peak memory --------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a code region: CUDA allocator peak, or the process's RSS high-water mark.

    On a CPU the region starts by handing freed heap memory back to the system
    (``malloc_trim``), so the peak RSS measures what is live plus what the region allocates; the
    peak is reset through ``/proc/self/clear_refs`` (Linux). Where that is not possible it is the
    process-wide peak so far (``resource.getrusage``). It includes the runtime and every model
    of the process, so compare variants by their differences. The measuring is the
    ``lightning-dino benchmark`` command's (``reset_peak_memory`` and ``peak_memory``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def reset(self) -> None:
        """Start a new region."""
        reset_peak_memory(self.device)

    def read(self) -> None:
        """End the region and keep the largest peak seen."""
        self.peak = max(self.peak, peak_memory(self.device))

    @staticmethod
    def label(device: torch.device) -> str:
        """``peak GPU memory`` or ``peak RSS``."""
        return "peak GPU memory" if device.type == "cuda" else "peak RSS"

    def describe(self) -> str:
        """``peak GPU memory 1.23 GiB`` or ``peak RSS 1.23 GiB``."""
        return f"{self.label(self.device)} {self.peak / 2**30:.2f} GiB"


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# (b) and (c): the loops outside Lightning ---------------------------------------------------


class PerViewBaseline:
    """The example-code pattern: one backbone and head call per crop, fp32, plain AdamW.

    Weights are in the default (contiguous) memory format, as example code leaves them.

    Clipping is the reference's ``utils.clip_gradients`` (a norm and an ``.item()`` per
    parameter); the EMA is the reference's Python loop over parameters.

    Args:
        student: Student network (deep-copied).
        teacher: Teacher network (deep-copied).
        out_dim: Number of prototypes K.
        clip: Per-tensor clip norm.
        device: Where it runs.
    """

    def __init__(
        self,
        student: MultiCropNetwork,
        teacher: MultiCropNetwork,
        out_dim: int,
        clip: float,
        device: torch.device,
    ) -> None:
        layout = {"device": device, "memory_format": torch.contiguous_format}  # no channels-last
        self.student = copy.deepcopy(student).to(**layout).train()
        self.teacher = copy.deepcopy(teacher).to(**layout).train()
        self.loss = DINOLoss(out_dim).to(device)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.student), lr=1e-4)
        self.clip = clip

    def step(self, crops: list[Tensor]) -> None:
        """One training step on a crop list ``[g1, g2, l1, ...]``."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = 1e-4
            if i == 0:
                group["weight_decay"] = 0.04
        with torch.no_grad():
            teacher_out = torch.stack(
                [self.teacher.head(self.teacher.backbone(c)) for c in crops[:2]]
            )
        student_out = torch.stack([self.student.head(self.student.backbone(c)) for c in crops])
        loss = self.loss(student_out, teacher_out, _TEACHER_TEMP)
        self.optimizer.zero_grad()
        loss.backward()
        for p in self.student.parameters():
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                coefficient = self.clip / (norm.item() + 1e-6)
                if coefficient < 1:
                    p.grad.data.mul_(coefficient)
        self.optimizer.step()
        with torch.no_grad():
            for student_param, teacher_param in zip(
                self.student.parameters(), self.teacher.parameters(), strict=True
            ):
                teacher_param.data.mul_(_MOMENTUM).add_(
                    (1 - _MOMENTUM) * student_param.detach().data
                )


class BareLoop:
    """A hand-written loop with the module's fast path: grouped forward, fused AdamW, foreach.

    Args:
        student: Student network (deep-copied).
        teacher: Teacher network (deep-copied).
        out_dim: Number of prototypes K.
        clip: Per-tensor clip norm.
        device: Where it runs.
        autocast: Builds the autocast context of the precision (or a null context).
    """

    def __init__(
        self,
        student: MultiCropNetwork,
        teacher: MultiCropNetwork,
        out_dim: int,
        clip: float,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.student = copy.deepcopy(student).to(device).train()
        self.teacher = copy.deepcopy(teacher).to(device).train()
        self.loss = DINOLoss(out_dim).to(device)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.student), lr=1e-4, fused=True)
        self.clip = clip
        self.autocast = autocast
        self.student_params = list(self.student.parameters())

    def step(self, crops: list[Tensor]) -> None:
        """One training step on a crop list ``[g1, g2, l1, ...]``."""
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
            group["weight_decay"] = 0.04 if group["name"] == "decay" else 0.0
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.student(crops)
            loss = self.loss(student_out, teacher_out, _TEACHER_TEMP)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_tensor(self.student_params, self.clip)
        self.optimizer.step()
        ema_update(self.teacher, self.student, _MOMENTUM)


# (a): Lightning, with (b) and (c) run in its pauses -----------------------------------------


class CycledBatches(Dataset):
    """``length`` items cycling over pre-built ``(crops, labels)`` batches (use batch_size=None)."""

    def __init__(self, batches: list[list[Tensor]], length: int) -> None:
        self.batches = batches
        self.length = length
        self.labels = torch.zeros(batches[0][0].shape[0], dtype=torch.int64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor]:
        return self.batches[index % len(self.batches)], self.labels


class CropData(pl.LightningDataModule):
    """Serves the pre-built crops; ``batch_size`` is what the module scales the lr by."""

    def __init__(self, batches: list[list[Tensor]], length: int) -> None:
        super().__init__()
        self.batches = batches
        self.length = length
        self.batch_size = batches[0][0].shape[0]

    def train_dataloader(self) -> DataLoader:
        """One epoch of ``length`` pre-built batches, no workers, no collation."""
        return DataLoader(CycledBatches(self.batches, self.length), batch_size=None)


class InterleavedRounds(Callback):
    """Times Lightning steps and, after every ``steps`` of them, runs the other loops.

    A round of (a) spans from the end of one ``on_train_batch_end`` (after the pause) to the
    ``on_train_batch_end`` ``steps`` batches later, so it covers every hook, the data fetch,
    logging and the EMA of ``steps`` batches.

    Args:
        steps: Steps per round of each loop.
        warmup: Lightning steps before the first round (not timed).
        loops: Name -> (step function, its own warm-up done once) of the other loops.
        crops: The pre-built crop lists the other loops cycle over.
        device: Where everything runs.
    """

    def __init__(
        self,
        steps: int,
        warmup: int,
        loops: dict[str, Callable[[list[Tensor]], None]],
        crops: list[list[Tensor]],
        device: torch.device,
    ) -> None:
        self.steps = steps
        self.warmup = warmup
        self.loops = loops
        self.crops = crops
        self.device = device
        self.seconds: dict[str, list[float]] = {"a": [], **{name: [] for name in loops}}
        self.memory = {name: PeakMemory(device) for name in self.seconds}
        self._start = 0.0
        self._batches = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Close a round of (a) every ``steps`` batches, run the other loops, restart timing."""
        self._batches += 1
        done = self._batches - self.warmup
        if done < 0 or done % self.steps:
            return
        if done > 0:
            synchronize(self.device)
            self.seconds["a"].append(time.perf_counter() - self._start)
            self.memory["a"].read()
        if done == 0:
            for step in self.loops.values():  # one untimed warm-up step each
                with torch.enable_grad():
                    step(self.crops[0])
        else:
            self._run_other_loops()
        self.memory["a"].reset()
        synchronize(self.device)
        self._start = time.perf_counter()

    def _run_other_loops(self) -> None:
        for name, step in self.loops.items():
            self.memory[name].reset()
            start = time.perf_counter()
            with torch.enable_grad():
                for i in range(self.steps):
                    step(self.crops[i % len(self.crops)])
            synchronize(self.device)
            self.seconds[name].append(time.perf_counter() - start)
            self.memory[name].read()


def lightning_trainer(
    device: torch.device,
    precision: str,
    max_steps: int,
    log_every_n_steps: int,
    root: str,
    callbacks: list[Callback],
) -> pl.Trainer:
    """A Trainer as a real run has it, minus checkpoints and the progress bar."""
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=log_every_n_steps,
        logger=TensorBoardLogger(root, name="throughput", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def measure_training(
    sections: dict[str, dict[str, Any]],
    device: torch.device,
    precision: str,
    steps: int,
    rounds: int,
    warmup: int,
    root: str,
) -> InterleavedRounds:
    """Run (a) with (b) and (c) interleaved; returns the callback holding the timings."""
    model_config, trainer_config = sections["model"], sections["trainer"]
    torch.manual_seed(0)
    module = DINO(**model_config)
    crops = random_crops(sections["data"], device, n_batches=2)
    out_dim, clip = module.hparams.out_dim, module.hparams.clip_grad
    student, teacher = module.student, module.teacher
    baseline = PerViewBaseline(student, teacher, out_dim, clip, device)
    bare = BareLoop(
        student, teacher, out_dim, clip, device, lambda: autocast_for(precision, device)
    )
    rounds_callback = InterleavedRounds(
        steps, warmup, {"b": baseline.step, "c": bare.step}, crops, device
    )
    max_steps = warmup + rounds * steps
    trainer = lightning_trainer(
        device,
        precision,
        max_steps,
        int(trainer_config.get("log_every_n_steps", 50)),
        root,
        [rounds_callback],
    )
    trainer.fit(module, datamodule=CropData(crops, max_steps))
    return rounds_callback


# Data loader and end to end -----------------------------------------------------------------


def measure_loader(data: dict[str, Any], batches: int, warmup: int = 2) -> tuple[float, str]:
    """Images/s of the config's ``train_dataloader()`` with its default workers.

    Returns:
        ``(images_per_second, description)``.
    """
    datamodule = MultiCropDataModule(**data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(_forever(loader))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * loader.batch_size / (time.perf_counter() - start)
    augmentation = datamodule.hparams.augmentation
    return rate, f"{augmentation} augmentation, {loader.num_workers} workers"


def _forever(loader: DataLoader) -> Any:
    while True:
        yield from loader


class StepTimer(Callback):
    """Seconds between ``on_train_batch_end`` of batch ``warmup`` and of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the time."""
        self.times.append(time.perf_counter())

    def images_per_second(self, batch_size: int) -> float:
        """Throughput over the timed batches."""
        timed = self.times[self.warmup - 1 :]
        return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


def measure_end_to_end(
    sections: dict[str, dict[str, Any]],
    device: torch.device,
    precision: str,
    steps: int,
    warmup: int,
    root: str,
) -> float:
    """Images/s of (a) fed by the config's data module (augmentation and workers included)."""
    torch.manual_seed(0)
    module = DINO(**sections["model"])
    datamodule = MultiCropDataModule(**sections["data"])
    timer = StepTimer(warmup)
    log_every = int(sections["trainer"].get("log_every_n_steps", 50))
    trainer = lightning_trainer(device, precision, warmup + steps, log_every, root, [timer])
    trainer.fit(module, datamodule=datamodule)
    return timer.images_per_second(int(data_setting(sections["data"], "batch_size")))


# Report -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a lightning-dino fit YAML")
    parser.add_argument("--steps", type=int, default=4, help="steps per round of each loop")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed Lightning steps")
    parser.add_argument(
        "--precision", default="auto", help="auto, 32-true or bf16-mixed (for (a) and (c))"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--loader-batches", type=int, default=10, help="timed loader batches (0 skips the loader)"
    )
    parser.add_argument(
        "--end-to-end-steps", type=int, default=10, help="timed end-to-end steps (0 skips)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*(warmup|does not have many workers).*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = read_config(args.config)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device, sections["trainer"])
    data = sections["data"]
    batch = int(data_setting(data, "batch_size"))
    n_global, n_local = data_setting(data, "n_global_crops"), data_setting(data, "n_local_crops")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {where} ({torch.get_num_threads()} threads), precision {precision} for (a) and "
        f"(c), fp32 for (b); backbone {sections['model'].get('backbone')}, batch {batch}, crops "
        f"{n_global}x{data_setting(data, 'global_crop_size')} + "
        f"{n_local}x{data_setting(data, 'local_crop_size')}; {args.rounds} rounds x "
        f"{args.steps} steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as root:
        timings = measure_training(
            sections, device, precision, args.steps, args.rounds, args.warmup, root
        )
        rates = {
            name: [batch * args.steps / s for s in seconds]
            for name, seconds in timings.seconds.items()
        }
        for i in range(args.rounds):
            print(
                f"round {i + 1}: "
                + " | ".join(f"({name}) {values[i]:.1f} img/s" for name, values in rates.items()),
                flush=True,
            )
        labels = {"a": "lightning (DINO)", "b": "per-view baseline", "c": "bare PyTorch loop"}
        for name, label in labels.items():
            print(
                f"({name}) {label:<18} {statistics.median(rates[name]):8.1f} img/s  "
                f"{timings.memory[name].describe()}"
            )
        rate_a = statistics.median(rates["a"])
        if args.loader_batches > 0:
            loader_rate, what = measure_loader(data, args.loader_batches)
            print(
                f"data loader alone ({what}): {loader_rate:.1f} img/s = {loader_rate / rate_a:.2f}x (a)"
            )
        if args.end_to_end_steps > 0:
            e2e = measure_end_to_end(sections, device, precision, args.end_to_end_steps, 2, root)
            print(f"end to end, (a) fed by the config's data loader: {e2e:.1f} img/s")
    a_b = statistics.median(a / b for a, b in zip(rates["a"], rates["b"], strict=True))
    a_c = statistics.median(a / c for a, c in zip(rates["a"], rates["c"], strict=True))
    print(f"a/b={a_b:.3f} a/c={a_c:.3f}")


if __name__ == "__main__":
    main()
