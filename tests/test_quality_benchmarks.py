"""The quality benchmark scripts run end to end on a tiny budget (no accuracy is asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "conf" / "tiny_vit.yaml"


def run(args, tmp_path):
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fashion_mnist_benchmark_script(tmp_path):
    out = run([str(ROOT / "benchmarks" / "fashion_mnist.py"), "--config", str(TINY), "--minutes", "0.02",
               "--eval-every", "0.01", "--out", str(tmp_path / "bench")], tmp_path)
    assert "final k-NN top1" in out and "raw pixels" in out and "random init" in out
    assert (tmp_path / "bench" / "curve.png").is_file()
    lines = (tmp_path / "bench" / "curve.csv").read_text().splitlines()
    assert lines[0] == "minutes,epoch,step,top1,top5" and len(lines) >= 3


def test_collapse_study_script(tmp_path):
    out = run([str(ROOT / "benchmarks" / "collapse_study.py"), "--config", str(TINY), "--steps", "3",
               "--bank-size", "0", "--out", str(tmp_path / "collapse")], tmp_path)
    for variant in ("DINO", "no centring", "no sharpening", "no momentum"):
        assert f"| {variant} |" in out
    assert (tmp_path / "collapse" / "collapse.png").is_file()
