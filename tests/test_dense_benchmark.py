"""benchmarks/dense.py: the mosaic builder's patch labels against the pixels under each patch, and
the whole benchmark end to end in --quick mode (every variant in the table, accuracies in [0, 1])."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_dense():
    """benchmarks/dense.py imported as a module (benchmarks/ is a folder of scripts)."""
    spec = importlib.util.spec_from_file_location("dense", ROOT / "benchmarks" / "dense.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dense"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_patch_labels_are_the_class_of_the_item_under_each_patch():
    dense = load_dense()
    # 10 classes x 3 items; item j of class c is filled with the grey level 10 * c + j, so the
    # pixels under a patch say which item (and class) lies there, independently of the builder.
    labels = torch.arange(10).repeat_interleave(3)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    fill = 10 * labels + torch.tensor([int((labels[:i] == labels[i]).sum()) for i in range(30)])
    items = fill[:, None, None].expand(30, 28, 28).to(torch.uint8)
    mosaics, item_labels = dense.make_mosaics(items, labels, 50, torch.Generator().manual_seed(1))
    assert mosaics.shape == (50, 1, 56, 56) and mosaics.dtype == torch.uint8
    assert len(item_labels.unique()) == 10  # the quadrants' classes vary
    for patch in (4, 7, 14):
        grid = 56 // patch
        got = dense.patch_labels(item_labels, grid)
        assert got.shape == (50, grid, grid)
        for m in range(50):
            for r in range(grid):
                for c in range(grid):
                    pixels = mosaics[m, 0, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                    assert len(pixels.unique()) == 1  # the patch lies on one item
                    assert got[m, r, c] == int(pixels[0, 0]) // 10
                    assert got[m, r, c] == item_labels[m, r // (grid // 2), c // (grid // 2)]


def test_quick_benchmark_reports_every_variant(tmp_path):
    dense = load_dense()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dense.py"), "--quick", "--budget-cpu-s", "0.5",
                             "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in dense.VARIANTS:
        assert f"| {dense.LABELS[variant]} |" in result.stdout
    with open(tmp_path / "dense.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(dense.VARIANTS)
    for row in rows:
        assert 0.0 <= float(row["patch_knn_top1"]) <= 1.0 and 0.0 <= float(row["image_knn_top1"]) <= 1.0
        assert (int(row["steps"]) > 0) == (row["variant"] != "random_init")
    assert (tmp_path / "dense_pca.png").stat().st_size > 0


def test_quick_distillation_benchmark_starts_both_students_from_the_same_weights(tmp_path, monkeypatch):
    """benchmarks/dense_distill.py --quick: every row, and the distilled student (and its EMA)
    starts from the scratch student's initial weights, with the trained teacher frozen."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("dense_distill", ROOT / "benchmarks" / "dense_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    starts = []
    original = module.dense.train_measured

    def recording_train(model, *args, **kwargs):
        student = getattr(model, "ema", None) or model.student
        starts.append({k: v.clone() for k, v in student.backbone.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(module.dense, "train_measured", recording_train)
    rows = module.main(["--quick", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["teacher", "random_init", "scratch", "distilled"]
    scratch, distilled = starts[1], starts[2]
    assert scratch.keys() == distilled.keys()
    assert all(torch.equal(scratch[k], distilled[k]) for k in scratch)
    for row in rows:
        assert 0.0 <= row["patch_knn_top1"] <= 1.0 and 0.0 <= row["image_knn_top1"] <= 1.0
    with open(tmp_path / "dense_distill.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == [r["variant"] for r in rows]


def test_quick_phases_benchmark_reports_every_variant(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dense_phases.py"), "--quick",
                             "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "dense_phases.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["v2_parts", "pretrain", "gram", "gram_high_res"]
    for row in rows.values():
        assert 0.0 <= float(row["patch_knn_top1"]) <= 1.0 and int(row["steps"]) > 0
    # The phased variants count the pre-training's steps and CPU time too.
    assert int(rows["gram"]["steps"]) > int(rows["pretrain"]["steps"])
    assert float(rows["gram_high_res"]["train_cpu_s"]) > float(rows["pretrain"]["train_cpu_s"])
