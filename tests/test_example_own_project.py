"""examples/own_project.py end to end on a tiny folder: own data module and Trainer, DINO
pre-training, export, and supervised fine-tuning of a trainable copy of the teacher."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dino import load_backbone

SCRIPT = Path(__file__).parents[1] / "examples" / "own_project.py"


def load_example():
    spec = importlib.util.spec_from_file_location("own_project", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore")
def test_own_project_pretrains_exports_and_finetunes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(36):  # 3 classes of coloured, noisy images of a few sizes
        colour = np.array([[255, 60, 60], [60, 255, 60], [60, 60, 255]][i % 3], dtype=np.float64)
        size = (40 + 4 * (i % 3), 36 + 4 * (i % 2))
        pixels = np.clip(colour * rng.uniform(0.5, 1.0) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
        folder = tmp_path / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")

    result = load_example().main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                                  "--epochs", "2", "--tiny"])
    assert result["steps"] == 2 * (27 // 8)  # 27 training images, batch 8, drop_last
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["val_acc"] <= 1.0
    # LearningRateMonitor logged DINO's schedule per step, starting from the warmup's 0.
    metrics = tmp_path / "out" / "pretrain" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    lrs = [float(r["lr-AdamW/decay"]) for r in rows if r.get("lr-AdamW/decay")]
    assert len(lrs) == result["steps"] and lrs[0] == 0.0 and max(lrs) > 0
    assert any(r.get("train/loss_epoch") for r in rows)
    # The export is the teacher; fine-tuning trained a copy of it, not the DINO module's teacher.
    exported = load_backbone(result["export"])
    teacher = result["model"].teacher.backbone
    tuned = result["finetune"].backbone
    for name, value in exported.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    assert any(not torch.equal(tuned.state_dict()[n], v) for n, v in exported.state_dict().items())
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
