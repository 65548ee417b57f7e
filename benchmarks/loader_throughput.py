"""Images/s per CPU core of the multi-crop data pipelines on real photos, interleaved in one process.

Every pipeline turns the same files into DINO multi-crop views (2 global crops of
``--global-crop-size``, 8 local crops of ``--local-crop-size``), one core for all
(``torch.set_num_threads(1)``; Pillow's decoder and filters are single-threaded):

* ``decode``: ``PIL.Image.open(p).convert("RGB")`` and ``.load()`` alone, the floor;
* ``ref``: the original DINO augmentation (facebookresearch/dino ``main_dino.py``
  ``DataAugmentationDINO`` with its ``utils.GaussianBlur`` and ``utils.Solarization``), written
  here from its published semantics with torchvision v1 transforms on PIL images, after the
  ImageFolder loader's ``open().convert("RGB")``;
* ``per_sample``: :func:`lightning_dino.data.load_image` then
  :class:`lightning_dino.data.MultiCropTransform`, image by image
  (``--data.augmentation per_sample``);
* ``batched``: what a DataLoader worker does with ``--data.augmentation batched``:
  :func:`load_image` for each file, then
  :meth:`lightning_dino.data.batched.BatchedMultiCropTransform.collate` on the whole batch;
* ``device_cpu``: the worker's share of ``--data.augmentation device``: :func:`load_image` and
  ``lightning_dino.data.batched.collate_images`` (uint8 images and labels; the augmentation
  runs on the accelerator, not measured here);
* ``streaming``: ``per_sample`` reading the same photos from a local LitData dataset
  (``--data.dataset streaming``): the stored bytes by position
  (:class:`lightning_dino.data.StreamingImages`), decoded, then :class:`MultiCropTransform`.
  The dataset is written once before the timed rounds by
  :func:`lightning_dino.prepare_streaming_dataset` in one process, whose images/s is printed.

Rounds are interleaved: each round runs every pipeline once over the same ``--batch`` files (a
new slice of the folder per round, cycling), in an order rotated each round, so load from other
processes hits all pipelines alike. A pipeline's images/s is the median over rounds; a ratio
to ``ref`` is the median of the per-round ratios. One untimed warm-up pass (a few files per
pipeline) reads the files into the page cache and pays first-call costs.

The last line reads ``batched/ref=<r> device_cpu/ref=<r> per_sample/ref=<r>
streaming/per_sample=<r>`` (on one line; the last ratio is the cost of streaming).

Examples:
    python benchmarks/photos.py --out data/photos --n 96
    python benchmarks/loader_throughput.py --photos data/photos
    python benchmarks/loader_throughput.py --photos data/photos --quick
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import PIL
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps, features
from torchvision import transforms

from lightning_dino import prepare_streaming_dataset
from lightning_dino.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    StreamingImages,
    load_image,
)
from lightning_dino.data import batched as batched_module
from lightning_dino.data.image_folders import IMG_EXTENSIONS
from lightning_dino.data.prepared.writer import plan_splits, scan_layout

N_LOCAL_CROPS = 8
PIPELINES = ("decode", "ref", "per_sample", "batched", "device_cpu", "streaming")
RATIOS = ("batched", "device_cpu", "per_sample")  # the last line, in this order
WARMUP_FILES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos", type=Path, required=True, help="folder of images (searched recursively)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument(
        "--batch", type=int, default=32, help="files per pipeline per round (default 32)"
    )
    parser.add_argument("--global-crop-size", type=int, default=224, help="default 224")
    parser.add_argument("--local-crop-size", type=int, default=96, help="default 96")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations' draws")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds of batch 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 2, 8
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# ref: facebookresearch/dino main_dino.py DataAugmentationDINO, torchvision v1 on PIL images.


class RefGaussianBlur:
    """dino ``utils.GaussianBlur``: PIL Gaussian blur with probability p, radius ~ U(0.1, 2)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:  # the reference applies it when random() <= p
            return img
        return img.filter(
            ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max))
        )


class RefSolarization:
    """dino ``utils.Solarization``: ``ImageOps.solarize`` (threshold 128) with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class RefDataAugmentationDINO:
    """dino ``DataAugmentationDINO(global_crops_scale=(0.4, 1), local_crops_scale=(0.05, 0.4))``."""

    def __init__(self, global_size: int, local_size: int, n_local_crops: int) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                    p=0.8,
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.global_transfo1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_color_jitter,
                RefGaussianBlur(1.0),
                normalize,
            ]
        )
        self.global_transfo2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_color_jitter,
                RefGaussianBlur(0.1),
                RefSolarization(0.2),
                normalize,
            ]
        )
        self.local_crops_number = n_local_crops
        self.local_transfo = transforms.Compose(
            [
                transforms.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic),
                flip_and_color_jitter,
                RefGaussianBlur(p=0.5),
                normalize,
            ]
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


def pil_loader(path: Path) -> Image.Image:
    """The default loader of torchvision's ImageFolder."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


# ---------------------------------------------------------------------------------------------


def collate_images_stand_in(
    samples: list[tuple[torch.Tensor, int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stand-in for ``batched.collate_images``: uint8 (3, H, W) images and int64 labels."""
    images = [image for image, _ in samples]
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


def prepare_photos(photos: Path, out: Path) -> tuple[StreamingImages, dict[Path, int], str]:
    """Write the photos as a LitData dataset in one process; its reader, positions and a note."""
    start = time.perf_counter()
    metadata = prepare_streaming_dataset(
        photos, out, val_fraction=0.0, num_workers=1, progress=False
    )
    seconds = time.perf_counter() - start
    unreadable = {path for path, _ in metadata["skipped"]}
    _, splits = plan_splits(scan_layout(photos), 0.0, unreadable)
    position = {Path(path).resolve(): i for i, (path, _) in enumerate(splits["train"])}
    size = metadata["splits"]["train"]["size"]
    note = (
        f"streaming: prepared {size} photos in {seconds:.2f} s on one process "
        f"(decode check + write) = {size / seconds:.1f} images/s"
    )
    return StreamingImages(str(out / "train")), position, note


def make_pipelines(
    args: argparse.Namespace, prepared: tuple[StreamingImages, dict[Path, int], str]
) -> tuple[dict[str, Callable[[list[Path]], object]], list[str]]:
    """The pipelines by name, each mapping a list of files to its output, and notes to print."""
    stored, position, prepare_note = prepared
    notes = [prepare_note]
    ref = RefDataAugmentationDINO(args.global_crop_size, args.local_crop_size, N_LOCAL_CROPS)
    per_sample = MultiCropTransform(
        global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size,
        n_local_crops=N_LOCAL_CROPS,
    )
    batched = batched_module.BatchedMultiCropTransform(
        global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size,
        n_local_crops=N_LOCAL_CROPS,
    )
    collate_images = getattr(batched_module, "collate_images", None)
    if collate_images is None:
        collate_images = collate_images_stand_in
        notes.append(
            "device_cpu: lightning_dino.data.batched.collate_images does not exist yet; "
            "timed a local stand-in (images as they are, int64 labels)"
        )

    def decode(files: list[Path]) -> object:
        out = []
        for p in files:
            image = Image.open(p).convert("RGB")
            image.load()
            out.append(image)
        return out

    def reference(files: list[Path]) -> object:
        return [ref(pil_loader(p)) for p in files]

    def per_sample_pipeline(files: list[Path]) -> object:
        return [per_sample(load_image(p)) for p in files]

    def batched_pipeline(files: list[Path]) -> object:
        samples = [(load_image(p), 0) for p in files]
        return batched.collate(samples)

    def device_cpu(files: list[Path]) -> object:
        return collate_images([(load_image(p), 0) for p in files])

    def streaming(files: list[Path]) -> object:
        return [per_sample(stored[position[p.resolve()]][0]) for p in files]

    pipelines = {
        "decode": decode,
        "ref": reference,
        "per_sample": per_sample_pipeline,
        "batched": batched_pipeline,
        "device_cpu": device_cpu,
        "streaming": streaming,
    }
    return pipelines, notes


def find_images(folder: Path) -> list[Path]:
    extensions = {ext.lower() for ext in IMG_EXTENSIONS}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def describe_images(files: list[Path]) -> str:
    sizes: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for p in files:
        with Image.open(p) as image:
            size = ImageOps.exif_transpose(image).size
            sizes[f"{size[0]}x{size[1]}"] = sizes.get(f"{size[0]}x{size[1]}", 0) + 1
            kinds[p.suffix.lower()] = kinds.get(p.suffix.lower(), 0) + 1
    top = sorted(sizes.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k}: {v}" for k, v in top[:4]) + (", ..." if len(top) > 4 else "")
    return (
        f"{len(files)} images ({shown}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + ")"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    files = find_images(args.photos)
    if not files:
        raise SystemExit(f"no images under {args.photos}")
    prepared_dir = tempfile.TemporaryDirectory(prefix="loader_throughput_")
    prepared = prepare_photos(args.photos, Path(prepared_dir.name) / "prepared")
    pipelines, notes = make_pipelines(args, prepared)

    print(f"photos: {args.photos}: {describe_images(files)}")
    print(
        f"one CPU core: torch.set_num_threads(1) (torch threads {torch.get_num_threads()}), "
        f"single-threaded Pillow; CPU: {cpu_model()}"
    )
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
        f"(libjpeg-turbo: {features.check_feature('libjpeg_turbo')})"
    )
    print(
        f"crops: 2 x {args.global_crop_size}px + {N_LOCAL_CROPS} x {args.local_crop_size}px; "
        f"{args.rounds} rounds x {args.batch} files per pipeline, order rotated each round"
    )
    for note in notes:
        print(f"note: {note}")

    # Warm-up: page cache, first-call costs (not timed).
    warm = files[: min(WARMUP_FILES, len(files))]
    for name, run in pipelines.items():
        try:
            run(warm)
        except ValueError as error:
            raise SystemExit(f"{name} failed on {[str(p) for p in warm]}: {error}") from error

    names = list(pipelines)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_share: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        batch = [files[(r * args.batch + k) % len(files)] for k in range(args.batch)]
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            cpu0, t0 = time.process_time(), time.perf_counter()
            pipelines[name](batch)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            rates[name].append(len(batch) / wall)
            cpu_share[name].append(cpu / wall)
        print(
            f"round {r + 1}/{args.rounds} ({' '.join(order)}): "
            + " ".join(f"{name}={rates[name][-1]:.1f}" for name in names)
            + " images/s",
            flush=True,
        )

    ratio = {
        name: statistics.median(a / b for a, b in zip(rates[name], rates["ref"], strict=True))
        for name in names
    }
    print()
    print(
        f"{'pipeline':<12} {'images/s/core':>13} {'min-max':>15} {'ms/image':>9} {'ratio to ref':>13} {'cpu/wall':>9}"
    )
    for name in names:
        median = statistics.median(rates[name])
        spread = f"{min(rates[name]):.1f}-{max(rates[name]):.1f}"
        print(
            f"{name:<12} {median:>13.1f} {spread:>15} {1000 / median:>9.2f} "
            f"{ratio[name]:>13.2f} {statistics.median(cpu_share[name]):>9.2f}"
        )
    print("(median over rounds; ratio = median of per-round ratios; cpu/wall ~1 means one core)")
    streaming_ratio = statistics.median(
        a / b for a, b in zip(rates["streaming"], rates["per_sample"], strict=True)
    )
    print(
        " ".join(f"{name}/ref={ratio[name]:.2f}" for name in RATIOS)
        + f" streaming/per_sample={streaming_ratio:.2f}"
    )
    prepared_dir.cleanup()


if __name__ == "__main__":
    main()
