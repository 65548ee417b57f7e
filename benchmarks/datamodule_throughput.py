"""Measure the throughput of ``MultiCropDataModule.train_dataloader()``: images/s and crops/s.

The data settings come from the ``data:`` section of a LightningCLI YAML (plain keys or
``class_path``/``init_args``), overridden by ``--data.KEY VALUE`` flags as on the CLI.
Worker start-up is excluded: the first ``--warmup`` batches are not timed.

Examples:
    python benchmarks/datamodule_throughput.py --config configs/quickstart.yaml
    python benchmarks/datamodule_throughput.py --data.dataset fashion_mnist --data.batch_size 128 \
        --data.global_crop_size 28 --data.local_crop_size 12 --batches 30
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lightning_dino.data import MultiCropDataModule


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="LightningCLI YAML with a data: section")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches (default 2)")
    args, rest = parser.parse_known_args(argv)
    return args, parse_data_flags(rest, parser)


def parse_data_flags(flags: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Turn ``--data.KEY VALUE`` / ``--data.KEY=VALUE`` flags into a dict of YAML values."""
    overrides: dict[str, Any] = {}
    tokens = iter(flags)
    for token in tokens:
        if not token.startswith("--data."):
            parser.error(f"unrecognised argument {token!r}; data settings are --data.KEY VALUE")
        key, _, value = token.removeprefix("--data.").partition("=")
        overrides[key] = yaml.safe_load(value if value else next(tokens, ""))
    return overrides


def read_data_section(config: Path | None) -> dict[str, Any]:
    """The ``data:`` settings of a LightningCLI config file, or {} without a file."""
    if config is None:
        return {}
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return dict(data.get("init_args", data))


def batches_forever(datamodule: MultiCropDataModule) -> Iterator[Any]:
    """Yield training batches, starting a new epoch whenever one ends."""
    loader = datamodule.train_dataloader()
    while True:
        yield from loader


def seconds_for(batches: Iterator[Any], count: int) -> float:
    """Seconds taken to draw ``count`` batches."""
    start = time.perf_counter()
    for _ in itertools.islice(batches, count):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    settings = {**read_data_section(args.config), **overrides}
    datamodule = MultiCropDataModule(**settings)
    start = time.perf_counter()
    datamodule.setup("fit")
    print(f"setup: {time.perf_counter() - start:.1f} s\n{datamodule.describe()}")

    batches = batches_forever(datamodule)
    warmup = seconds_for(batches, args.warmup)
    print(f"warm-up: {args.warmup} batches in {warmup:.1f} s (includes starting the workers)")
    elapsed = seconds_for(batches, args.batches)
    images = args.batches * datamodule.hparams.batch_size
    print(
        f"{images} images in {elapsed:.2f} s: {images / elapsed:.1f} images/s, "
        f"{images * datamodule.n_crops / elapsed:.1f} crops/s"
    )


if __name__ == "__main__":
    main()
