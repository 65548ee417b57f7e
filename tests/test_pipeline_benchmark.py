"""Smoke tests of benchmarks/photos.py and benchmarks/loader_throughput.py, offline and tiny."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_script(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / args[0]), *args[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def fake_wheel(path: Path, members: dict[str, Image.Image]) -> None:
    """A zip named like a wheel holding the given images, so photos.py needs no download."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, image in members.items():
            data = io.BytesIO()
            image.save(data, "PNG" if name.endswith(".png") else "JPEG")
            archive.writestr(name, data.getvalue())


def test_photos_builds_the_folder_from_cached_wheels_and_is_idempotent(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(
        wheels / "scikit_image-0.0-py3-none-any.whl",
        {
            "skimage/data/astronaut.png": random_image(512, 512, 0),
            "skimage/data/coffee.png": random_image(600, 400, 1),
            "skimage/data/chelsea.png": random_image(120, 90, 2),  # too small: skipped
        },
    )
    fake_wheel(
        wheels / "scikit_learn-0.0-py3-none-any.whl",
        {"sklearn/datasets/images/china.jpg": random_image(640, 427, 3)},
    )
    out = tmp_path / "photos"
    lines = run_script("photos.py", "--out", str(out), "--n", "6", "--wheels", str(wheels))
    text = "\n".join(lines)
    assert "3 source photographs" in text and "skipped skimage/data/chelsea.png" in text

    jpegs = sorted(out.rglob("photo_*.jpg"))
    assert [p.relative_to(out).parent.name for p in jpegs] == ["a", "a", "b", "b", "b", "b"]
    sizes = [Image.open(p).size for p in jpegs]
    assert sizes == [(500, 375), (375, 500)] * 3
    assert len({p.read_bytes() for p in jpegs}) == 6  # distinct crops

    rotated = Image.open(out / "b" / "exif_rotated.jpg")
    assert rotated.getexif()[0x0112] == 6 and rotated.size == (500, 375)
    assert ImageOps.exif_transpose(rotated).size == (375, 500)
    assert Image.open(out / "b" / "photo.png").format == "PNG"
    assert Image.open(out / "b" / "photo.jfif").format == "JPEG"

    again = run_script("photos.py", "--out", str(out), "--n", "6", "--wheels", str(wheels))
    assert "nothing to do" in again[-1]


def test_loader_throughput_runs_on_mixed_sizes_and_ends_with_the_ratios(tmp_path):
    for i in range(6):
        size = (120, 90) if i % 2 == 0 else (90, 120)
        folder = tmp_path / ("a" if i < 2 else "b")
        folder.mkdir(exist_ok=True)
        random_image(*size, seed=i).save(folder / f"{i}.jpg", quality=90)
    lines = run_script(
        "loader_throughput.py",
        "--photos",
        str(tmp_path),
        "--quick",
        "--global-crop-size",
        "32",
        "--local-crop-size",
        "16",
    )
    text = "\n".join(lines)
    assert "torch.set_num_threads(1)" in text
    for name in ("decode", "ref", "per_sample", "batched", "device_cpu", "streaming"):
        assert re.search(rf"^{name}\s+\d", text, re.MULTILINE), text
    assert re.search(r"streaming: prepared 6 photos in .* = \d+\.\d images/s", text), text
    match = re.fullmatch(
        r"batched/ref=(\d+\.\d\d) device_cpu/ref=(\d+\.\d\d) per_sample/ref=(\d+\.\d\d)"
        r" streaming/per_sample=(\d+\.\d\d)",
        lines[-1],
    )
    assert match, lines[-1]
    assert all(float(ratio) > 0 for ratio in match.groups())


def test_reduced_decoding_benchmark_reports_the_speedup_and_crop_difference(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        random_image(250, 188, i).save(photos / f"photo_{i:04d}.jpg", quality=90)
    lines = run_script(
        "reduced_decoding.py", "--photos", str(photos), "--n", "2", "--upscale", "8", "--crops", "3"
    )
    assert "photo_0000.jpg: (1504, 2000) -> (752, 1000)" in lines  # 1/2: 1/4 is < 251k pixels
    match = re.fullmatch(r"reduced/full=([\d.]+) crop_diff_median=([\d.]+)", lines[-1])
    assert match and float(match[1]) > 0 and 0 <= float(match[2]) < 10
