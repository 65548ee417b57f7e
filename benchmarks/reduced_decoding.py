"""Reduced-size JPEG decoding on phone-sized photos: time per image and what it changes.

Phone cameras write 12-megapixel JPEGs; DINO's crops need far fewer pixels. With
``min_pixels`` (:func:`lightning_dino.data.transforms.min_decode_pixels` of the crops),
:func:`lightning_dino.data.load_image` decodes at 1/2, 1/4 or 1/8 size by DCT scaling, never
below the size at which the smallest crop would be upsampled.

Protocol: each photo of ``--photos`` (ImageNet-sized JPEGs from ``benchmarks/photos.py``) is
upscaled ``--upscale`` times (bicubic) and saved as a quality-92 JPEG, standing in for a phone
photo. Full and reduced decoding alternate on every file, one core
(``torch.set_num_threads(1)``); the medians are reported. Then ``--crops`` random local-crop
boxes per photo (area fraction 0.05-0.4, aspect 3/4-4/3) are cut from both decodes and
resized to 96 px; the mean absolute difference per crop is reported in grey levels (0-255).

The last line reads ``reduced/full=<speedup> crop_diff_median=<grey levels>``.

Examples:
    python benchmarks/photos.py --out data/photos --n 96
    python benchmarks/reduced_decoding.py --photos data/photos --n 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lightning_dino.data import load_image
from lightning_dino.data.batched import sample_crop_boxes
from lightning_dino.data.transforms import min_decode_pixels

DINO_VIEWS = [(224, (0.4, 1.0)), (96, (0.05, 0.4))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of JPEG photos")
    parser.add_argument("--n", type=int, default=8, help="photos to use (default 8)")
    parser.add_argument("--upscale", type=int, default=8, help="upscale factor (default 8)")
    parser.add_argument("--crops", type=int, default=20, help="crops compared per photo")
    return parser.parse_args(argv)


def make_phone_photos(photos: Path, n: int, upscale: int, out: Path) -> list[Path]:
    """Upscaled copies of the first ``n`` JPEGs under ``photos``, saved under ``out``."""
    sources = sorted(p for p in photos.rglob("*.jpg") if p.name.startswith("photo_"))[:n]
    if not sources:
        raise SystemExit(f"no photo_*.jpg under {photos}; run benchmarks/photos.py first")
    paths = []
    for source in sources:
        with Image.open(source) as image:
            big = image.convert("RGB").resize(
                (image.width * upscale, image.height * upscale), Image.BICUBIC
            )
        path = out / source.name
        big.save(path, quality=92)
        paths.append(path)
    return paths


def crop_differences(full: torch.Tensor, reduced: torch.Tensor, n: int) -> list[float]:
    """Mean |difference| (grey levels) of ``n`` local crops cut from both decodes at 96 px."""
    factor = full.shape[-1] / reduced.shape[-1]
    boxes = sample_crop_boxes(n, reduced.shape[1], reduced.shape[2], (0.05, 0.4)).tolist()
    out = []
    for top, left, h, w in boxes:
        ours = reduced[None, :, top : top + h, left : left + w].float()
        rows = slice(round(top * factor), round((top + h) * factor))
        cols = slice(round(left * factor), round((left + w) * factor))
        theirs = full[None, :, rows, cols].float()
        resize = {"size": (96, 96), "mode": "bicubic", "antialias": True}
        out.append((F.interpolate(ours, **resize) - F.interpolate(theirs, **resize)).abs().mean())
    return [value.item() for value in out]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    min_pixels = min_decode_pixels(DINO_VIEWS)
    with tempfile.TemporaryDirectory(prefix="reduced_decoding_") as tmp:
        paths = make_phone_photos(args.photos, args.n, args.upscale, Path(tmp))
        full_s, reduced_s, diffs = [], [], []
        for path in paths:
            start = time.process_time()
            full = load_image(path)
            full_s.append(time.process_time() - start)
            start = time.process_time()
            reduced = load_image(path, min_pixels, 256)
            reduced_s.append(time.process_time() - start)
            diffs += crop_differences(full, reduced, args.crops)
            print(f"{path.name}: {tuple(full.shape[1:])} -> {tuple(reduced.shape[1:])}")
    full_ms, reduced_ms = statistics.median(full_s) * 1e3, statistics.median(reduced_s) * 1e3
    print(f"decode, full size: {full_ms:.1f} ms/image; reduced: {reduced_ms:.1f} ms/image")
    print(
        f"crop difference (96-px local crops, grey levels): median {statistics.median(diffs):.2f}"
        f", 95th percentile {sorted(diffs)[int(0.95 * len(diffs))]:.2f}, max {max(diffs):.2f}"
    )
    print(f"reduced/full={full_ms / reduced_ms:.2f} crop_diff_median={statistics.median(diffs):.2f}")


if __name__ == "__main__":
    main()
