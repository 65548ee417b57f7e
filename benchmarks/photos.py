"""Build a folder of real photographs at ImageNet size from the sample photos in two PyPI wheels.

No dataset is downloaded: the scikit-image and scikit-learn wheels ship a few real colour
photographs as package data. This script fetches the two wheels with pip (``pip download
--no-deps --only-binary=:all:``, cached under ``data/.wheels``; nothing is installed), reads the
images from inside the wheels with :mod:`zipfile`, and writes ``--n`` distinct JPEG files
(quality 90) at the typical ImageNet sizes, 500x375 (landscape) and 375x500 (portrait)
alternately, each a different random crop (fixed seed; position random, short side at least
60% of the source's short side) of a source photo resized with PIL bicubic. About a third of
the files go to ``OUT/a/`` and the rest to ``OUT/b/`` (ImageFolder-style class folders).

Sources kept (colour photographs of everyday scenes, short side >= 300 px):

* ``skimage/data/astronaut.png`` (512x512, Eileen Collins, NASA)
* ``skimage/data/chelsea.png`` (451x300, a cat)
* ``skimage/data/coffee.png`` (600x400, a cup of coffee)
* ``skimage/data/motorcycle_left.png`` and ``motorcycle_right.png`` (741x500, a stereo pair)
* ``skimage/data/rocket.jpg`` (640x427, a rocket launch)
* ``sklearn/datasets/images/china.jpg`` (640x427, a temple)
* ``sklearn/datasets/images/flower.jpg`` (640x427, a flower)

Skipped: grayscale images (brick, camera, cell, clock_motion, coins, grass, gravel, moon,
page, text), synthetic or drawn ones (chessboard_*, color, horse, logo, phantom), tiny ones
(microaneurysms), and scientific imaging unlike ImageNet photos, mostly black or uniform
(hubble_deep_field, retina, ihc), whose JPEGs decode unrepresentatively fast.

Besides the ``--n`` JPEGs it writes three variants users have, in ``OUT/b/``: a JPEG whose
pixels are stored sideways with the EXIF orientation tag 6 (viewers rotate it upright), a PNG
and a ``.jfif`` JPEG. It is idempotent: if ``OUT`` already holds exactly these files, it does
nothing.

Examples:
    python benchmarks/photos.py --out data/photos --n 96
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WHEEL_CACHE = REPO / "data" / ".wheels"
SOURCES = {
    "scikit_image": (
        "skimage/data/astronaut.png",
        "skimage/data/chelsea.png",
        "skimage/data/coffee.png",
        "skimage/data/motorcycle_left.png",
        "skimage/data/motorcycle_right.png",
        "skimage/data/rocket.jpg",
    ),
    "scikit_learn": (
        "sklearn/datasets/images/china.jpg",
        "sklearn/datasets/images/flower.jpg",
    ),
}
PIP_NAMES = {"scikit_image": "scikit-image", "scikit_learn": "scikit-learn"}
SIZE = (500, 375)  # landscape (width, height); portrait is the transpose
MIN_SHORT_SIDE = 300
MIN_CROP_FRACTION = 0.6  # of the source's short side
QUALITY = 90
SEED = 0
VARIANTS = ("b/exif_rotated.jpg", "b/photo.png", "b/photo.jfif")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "data" / "photos", help="folder to create"
    )
    parser.add_argument("--n", type=int, default=96, help="number of JPEG photos (default 96)")
    parser.add_argument("--wheels", type=Path, default=WHEEL_CACHE, help="wheel cache folder")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    return args


def wheel_path(package: str, cache: Path) -> Path:
    """The cached wheel of ``package`` (e.g. ``scikit_image``), downloaded with pip if missing."""
    cached = sorted(cache.glob(f"{package}-*.whl"))
    if not cached:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {PIP_NAMES[package]} wheel to {cache} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                PIP_NAMES[package],
                "-d",
                str(cache),
            ],
            check=True,
        )
        cached = sorted(cache.glob(f"{package}-*.whl"))
        if not cached:
            raise SystemExit(f"pip did not leave a {package} wheel in {cache}")
    return cached[-1]


def load_sources(cache: Path) -> list[tuple[str, Image.Image]]:
    """The kept source photographs as RGB PIL images, checked to be colour and large enough."""
    sources = []
    for package, members in SOURCES.items():
        wheel = wheel_path(package, cache)
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for member in members:
                if member not in names:
                    print(f"  skipped {member}: not in {wheel.name}")
                    continue
                image = Image.open(io.BytesIO(archive.read(member)))
                image.load()
                if image.mode != "RGB" or min(image.size) < MIN_SHORT_SIDE:
                    print(f"  skipped {member}: {image.mode} {image.size[0]}x{image.size[1]}")
                    continue
                sources.append((f"{wheel.name.split('-')[0]}:{member}", image))
    if not sources:
        raise SystemExit("no source photographs found in the wheels")
    return sources


def random_crop(image: Image.Image, portrait: bool, rng: random.Random) -> Image.Image:
    """A random 4:3 (or 3:4) crop, short side >= 60% of the image's, resized to 500x375."""
    width, height = image.size
    out_w, out_h = (SIZE[1], SIZE[0]) if portrait else SIZE
    # Largest crop short side with the output's aspect ratio that fits in the image.
    max_short = (
        min(width, height * out_w / out_h) if portrait else min(height, width * out_h / out_w)
    )
    min_short = min(MIN_CROP_FRACTION * min(width, height), max_short)
    short = rng.uniform(min_short, max_short)
    crop_w, crop_h = (short, short * out_h / out_w) if portrait else (short * out_w / out_h, short)
    crop_w, crop_h = min(round(crop_w), width), min(round(crop_h), height)
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)


def file_names(n: int) -> list[str]:
    """Relative paths of the ``n`` JPEGs: the first third in ``a/``, the rest in ``b/``."""
    n_a = n // 3
    return [f"{'a' if i < n_a else 'b'}/photo_{i:04d}.jpg" for i in range(n)]


def existing_images(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    expected = set(file_names(args.n)) | set(VARIANTS)
    if out.exists() and existing_images(out) == expected:
        print(
            f"{out} already holds the {args.n} photos and {len(VARIANTS)} variants; nothing to do"
        )
        return
    if out.exists() and not existing_images(out) <= expected:
        raise SystemExit(
            f"{out} exists with other files than the {args.n} expected photos; "
            "remove it or choose another --out"
        )

    sources = load_sources(args.wheels)
    print(f"{len(sources)} source photographs:")
    for name, image in sources:
        print(f"  {name} ({image.size[0]}x{image.size[1]})")

    rng = random.Random(SEED)
    digests: set[str] = set()
    written: list[tuple[str, Image.Image]] = []
    per_source: dict[str, int] = {}
    for i, name in enumerate(file_names(args.n)):
        # Alternate landscape and portrait; cycle the sources every two files so each source
        # gives both orientations.
        source_name, source = sources[(i // 2) % len(sources)]
        portrait = i % 2 == 1
        while True:
            photo = random_crop(source, portrait, rng)
            data = io.BytesIO()
            photo.save(data, "JPEG", quality=QUALITY)
            digest = hashlib.sha256(data.getvalue()).hexdigest()
            if digest not in digests:
                break
        digests.add(digest)
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.getvalue())
        written.append((name, photo))
        per_source[source_name] = per_source.get(source_name, 0) + 1

    # Variants, from fresh crops of the first sources.
    portrait_photo = random_crop(sources[0][1], True, rng)
    exif = Image.Exif()
    exif[0x0112] = (
        6  # stored pixels are rotated 90 degrees counter-clockwise: viewers turn them back
    )
    sideways = portrait_photo.transpose(Image.Transpose.ROTATE_90)
    sideways.save(out / VARIANTS[0], "JPEG", quality=QUALITY, exif=exif)
    random_crop(sources[1 % len(sources)][1], False, rng).save(out / VARIANTS[1], "PNG")
    random_crop(sources[2 % len(sources)][1], True, rng).save(
        out / VARIANTS[2], "JPEG", quality=QUALITY
    )

    n_a = sum(name.startswith("a/") for name, _ in written)
    print(
        f"wrote {args.n} JPEGs (quality {QUALITY}, {SIZE[0]}x{SIZE[1]} and {SIZE[1]}x{SIZE[0]} "
        f"alternately) to {out}: {n_a} in a/ ({written[0][0]} ... {written[n_a - 1][0]}), "
        f"{args.n - n_a} in b/ ({written[n_a][0]} ... {written[-1][0]})"
    )
    print(
        "  crops per source: " + ", ".join(f"{k.split(':')[1]} {v}" for k, v in per_source.items())
    )
    print(
        f"wrote {len(VARIANTS)} variants: {VARIANTS[0]} ({sideways.size[0]}x{sideways.size[1]} "
        f"stored, EXIF orientation 6: upright {portrait_photo.size[0]}x{portrait_photo.size[1]}), "
        f"{VARIANTS[1]}, {VARIANTS[2]}"
    )


if __name__ == "__main__":
    main()
