"""Smoke tests: the benchmark scripts run end to end on tiny models (no timings checked)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY_CONFIG = """
trainer: {log_every_n_steps: 2}
model: {backbone: test_resnet, out_dim: 64, hidden_dim: 32, bottleneck_dim: 16,
        warmup_epochs: 0, freeze_last_layer: 0}
data: {dataset: synthetic, batch_size: 4, num_workers: 0, global_crop_size: 32,
       local_crop_size: 16, n_local_crops: 2, synthetic_size: 16, synthetic_image_size: 32,
       augmentation: batched}
"""


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` (a folder of scripts, not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_throughput_runs_end_to_end_and_ends_with_the_ratios(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    throughput = load_script("throughput")
    throughput.main(
        [
            "--config",
            str(config),
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--loader-batches",
            "1",
            "--end-to-end-steps",
            "1",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"a/b=\d+\.\d{3} a/c=\d+\.\d{3}", lines[-1]), lines[-1]
    text = "\n".join(lines)
    for expected in (
        "(a) lightning",
        "(b) per-view",
        "(c) bare",
        "data loader alone",
        "end to end",
    ):
        assert expected in text


@pytest.mark.slow
@pytest.mark.tier2
def test_the_gpu_script_runs_every_step_in_its_cpu_dry_run(tmp_path):
    """benchmarks/gpu.sh is run once on a lent GPU: every step must work the first time."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "gpu_benchmark.log").read_text()
    assert done.returncode == 0 and "!! step failed" not in log, log[-3000:]
    assert "largest batch that fits: 16 per device" in log and "activation checkpointing at batch 16" in log
    assert log.count("images/s, ") >= 6 and "a/b=" in log
