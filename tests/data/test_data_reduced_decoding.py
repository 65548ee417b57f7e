"""Reduced-size JPEG decoding (DCT scaling): never upsamples a crop, stays within tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_dino.data import MultiCropDataModule, load_image
from lightning_dino.data.batched import sample_crop_boxes
from lightning_dino.data.image_folders import ImageFolderDataset, jpeg_reduction
from lightning_dino.data.transforms import min_decode_pixels

DINO_VIEWS = [(224, (0.4, 1.0)), (96, (0.05, 0.4))]


def smooth_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: random colours at low resolution, upsampled (no JPEG-hostile noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize(
    ("size", "min_pixels", "min_side", "expected"),
    [
        ((4032, 3024), 250_907, 0, 4),  # 1008 x 756 = 762k >= 251k; 504 x 378 = 190k is not
        ((4032, 3024), 100_000, 0, 8),
        ((1000, 750), 250_907, 0, 1),  # 500 x 375 = 187k < 251k
        ((1001, 751), 180_000, 0, 2),  # ceil: 501 x 376
        ((8000, 1000), 100_000, 256, 2),  # 4:1 panorama: the shorter side binds, not the area
        ((640, 480), 1, 0, 8),
        ((6, 400), 1, 0, 4),  # never below one pixel
    ],
)
def test_jpeg_reduction_is_the_strongest_that_keeps_both_bounds(
    size, min_pixels, min_side, expected
):
    assert jpeg_reduction(size, min_pixels, min_side) == expected


def test_min_decode_pixels_is_the_tight_area_below_which_a_crop_would_be_upsampled():
    torch.manual_seed(0)
    assert min_decode_pixels(DINO_VIEWS) == math.ceil(97**2 / (0.75 * 0.05))  # locals bind
    for size, scale in DINO_VIEWS:
        area = min_decode_pixels([(size, scale)])
        side = math.isqrt(area) + 1  # a square image of at least that area
        boxes = sample_crop_boxes(20_000, side, side, scale)
        assert boxes[:, 2:].min() >= size  # no crop smaller than the output: never upsampled
        # Tight: at 70 % of that area, the smallest crops would be upsampled.
        small = math.isqrt(int(0.7 * area))
        boxes = sample_crop_boxes(20_000, small, small, scale)
        assert boxes[:, 2:].min() < size


def test_reduced_decode_of_a_phone_sized_jpeg_is_within_tolerance(tmp_path):
    path = tmp_path / "phone.jpg"
    smooth_photo(4032, 3024).save(path, quality=92)
    full = load_image(path)
    reduced = load_image(path, min_decode_pixels(DINO_VIEWS))
    assert tuple(full.shape) == (3, 3024, 4032) and tuple(reduced.shape) == (3, 756, 1008)
    # The same crop (area fraction, aspect, position) cut from both and resized to 96 px:
    # the per-crop mean difference is about one grey level (box corners snap to the 4x
    # coarser grid; the DCT scaling filters a little differently from bicubic).
    torch.manual_seed(0)
    boxes = sample_crop_boxes(40, 756, 1008, (0.05, 0.4)).tolist()
    errors = []
    for top, left, h, w in boxes:
        ours = F.interpolate(
            reduced[None, :, top : top + h, left : left + w].float(), size=(96, 96),
            mode="bicubic", antialias=True,
        )
        box = full[None, :, 4 * top : 4 * (top + h), 4 * left : 4 * (left + w)].float()
        expected = F.interpolate(box, size=(96, 96), mode="bicubic", antialias=True)
        errors.append((ours - expected).abs().mean().item())
    assert np.median(errors) < 1.5 and max(errors) < 4.0, errors


def test_only_jpegs_are_reduced_and_exif_orientation_still_applies(tmp_path):
    photo = smooth_photo(2000, 1500)
    photo.save(tmp_path / "big.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    assert tuple(load_image(tmp_path / "big.png", 10_000).shape) == (3, 1500, 2000)
    assert tuple(load_image(tmp_path / "rotated.jpg", 10_000).shape) == (3, 250, 188)
    photo.resize((2001, 1501)).save(tmp_path / "odd.jpg", quality=90)  # ceil(2001 / 8) = 251
    assert tuple(load_image(tmp_path / "odd.jpg", 10_000).shape) == (3, 188, 251)


def test_folder_training_decodes_reduced_and_evaluation_keeps_its_resize(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            smooth_photo(1600, 1200, seed=i).save(tmp_path / label / f"{i}.jpg", quality=90)
    data = MultiCropDataModule(
        dataset="folder", data_dir=str(tmp_path), batch_size=2, num_workers=0,
        global_crop_size=32, local_crop_size=16, augmentation="per_sample", val_fraction=0.25,
    )
    data.setup("fit")
    # Crops of 32 and 16 px and an evaluation resize of 37 px: 1/8 still suffices.
    folder = data.knn_train_dataset.dataset.dataset
    assert isinstance(folder, ImageFolderDataset) and folder.min_side == 37
    assert tuple(folder[0][0].shape) == (3, 150, 200)  # what the training workers decode
    crops, _ = next(iter(data.train_dataloader()))
    assert tuple(crops[0].shape) == (2, 3, 32, 32)
    image, _ = data.knn_train_dataset[0]
    assert tuple(image.shape) == (3, 32, 32)


def test_streamed_bytes_decode_like_the_file_at_the_same_reduced_size(tmp_path):
    from lightning_dino.data.prepared.streaming import DecodeSample, decode_image

    path = tmp_path / "phone.jpg"
    smooth_photo(3000, 2000).save(path, quality=90)
    data, sizes = path.read_bytes(), {"min_pixels": 100_000, "min_side": 224}
    from_file = load_image(path, **sizes)
    assert tuple(from_file.shape) == (3, 500, 750)
    assert torch.equal(decode_image(data, **sizes), from_file)
    image, label = DecodeSample(None, **sizes)({"image": data, "label": 3})
    assert torch.equal(image, from_file) and label == 3
