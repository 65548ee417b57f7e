"""Image folders: files found and read as phone photos and odd files need, damage skipped and named."""

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dino.data.image_folders import (
    UNLABELED,
    ImageFolderDataset,
    image_file_problem,
    load_image,
)


def names(dataset):
    return [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]


def png_with_declared_size(width, height):
    """A PNG whose header declares ``width`` x ``height`` but holds no pixel data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_flat_folder_case_insensitive_extensions_and_ignored_files(tmp_path, write_image):
    for name in ("a.JPG", "b.png", "c.Jpeg", "d.TIFF", "e.bmp", "f.webp", "g.gif", "h.ppm"):
        write_image(tmp_path / name)
    write_image(tmp_path / "gray.pgm", mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "image.jpg.bak").write_bytes(b"x")
    write_image(tmp_path / ".hidden.png")
    (tmp_path / "._a.JPG").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(tmp_path)
    # Files skipped for their extension are listed once (hidden files are not counted).
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "ignored 2 file(s)" in str(caught[0].message) and ".bak (1), .txt (1)" in str(caught[0].message)
    assert names(dataset) == [
        "a.JPG",
        "b.png",
        "c.Jpeg",
        "d.TIFF",
        "e.bmp",
        "f.webp",
        "g.gif",
        "gray.pgm",
        "h.ppm",
    ]
    assert dataset.classes == [] and set(dataset.labels) == {UNLABELED}
    image, label = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12) and label == -1


def test_class_subfolders_give_sorted_labels(tmp_path, write_image):
    write_image(tmp_path / "dog" / "b.png")
    write_image(tmp_path / "dog" / "nested" / "deeper" / "c.jpg")
    write_image(tmp_path / "cat" / "a.PNG")
    write_image(tmp_path / "loose.png")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("no images here")
    dataset = ImageFolderDataset(tmp_path, transform=lambda image: image.shape)
    assert dataset.classes == ["cat", "dog"] and dataset.class_to_idx == {"cat": 0, "dog": 1}
    assert names(dataset) == ["cat/a.PNG", "dog/b.png", "dog/nested/deeper/c.jpg", "loose.png"]
    assert dataset.labels == [0, 1, 1, UNLABELED]
    assert dataset[1] == ((3, 10, 12), 1)


def test_fixed_class_map_for_a_validation_split(tmp_path, write_image):
    write_image(tmp_path / "dog" / "b.png")
    assert ImageFolderDataset(tmp_path, class_to_idx={"cat": 0, "dog": 1}).labels == [1]
    with pytest.raises(ValueError, match=r"\['dog'\].*known classes \['cat'\]"):
        ImageFolderDataset(tmp_path, class_to_idx={"cat": 0})


def test_missing_empty_and_non_directory_roots_are_named(tmp_path, write_image):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match=f"no image files found under {tmp_path}"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.jpg, \.jpeg, \.jfif, \.png"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolderDataset(write_image(tmp_path / "file.png"))


@pytest.fixture
def corrupt_folder(tmp_path, write_image):
    """Two good images and one of each kind of unreadable file."""
    write_image(tmp_path / "good1.jpg")
    write_image(tmp_path / "good2.png", seed=1)
    jpeg = write_image(tmp_path / "ok.jpg", size=(64, 48)).read_bytes()
    (tmp_path / "ok.jpg").unlink()
    bad = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": write_image(tmp_path / "t.png", size=(64, 48)).read_bytes()[:300],
        "truncated.gif": write_image(tmp_path / "t.gif", size=(64, 48)).read_bytes()[:200],
        "zero.png": b"",
        "random.jpg": np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "bomb.png": png_with_declared_size(100_000, 100_000),
        "zero_size.png": png_with_declared_size(0, 5),
    }
    for temporary in ("t.png", "t.gif"):
        (tmp_path / temporary).unlink()
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, sorted(bad)


def test_corrupt_files_are_skipped_with_one_warning(corrupt_folder):
    root, bad = corrupt_folder
    with pytest.warns(UserWarning) as record:
        dataset = ImageFolderDataset(root)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"skipped {len(bad)} unreadable image file(s) under {root}" in message
    assert all(name in message for name in bad)
    assert names(dataset) == ["good1.jpg", "good2.png"]
    assert sorted(os.path.basename(path) for path, _ in dataset.skipped) == bad
    assert [dataset[i][0].shape for i in range(2)] == [(3, 10, 12)] * 2


def test_corrupt_file_raises_when_not_skipping(corrupt_folder):
    root, _ = corrupt_folder
    with pytest.raises(ValueError, match=r"unreadable image file .*bomb\.png.*skip_corrupt"):
        ImageFolderDataset(root, skip_corrupt=False)


def test_every_file_corrupt_is_an_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="none of"):
        ImageFolderDataset(tmp_path)


def test_pixel_limit_rejects_images_between_one_and_two_times_the_limit(
    tmp_path, write_image, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    write_image(tmp_path / "small.png", size=(8, 8))
    write_image(tmp_path / "warns.png", size=(12, 12))  # 144 px: PIL only warns
    write_image(tmp_path / "errors.png", size=(20, 20))  # 400 px: PIL raises
    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = ImageFolderDataset(tmp_path)
    assert names(dataset) == ["small.png"]
    assert image_file_problem(str(tmp_path / "warns.png")).startswith("DecompressionBomb")


def test_decoding_failure_at_load_time_falls_back_deterministically(tmp_path, write_image):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i)
    dataset = ImageFolderDataset(tmp_path)
    expected = dataset[2][0]
    (tmp_path / "1.png").write_bytes(b"garbage after the validation pass")
    with pytest.warns(UserWarning, match=r"cannot decode image .*1\.png"):
        image, label = dataset[1]
    assert torch.equal(image, expected) and label == UNLABELED
    assert list(dataset.failed_at_load) == [str(tmp_path / "1.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known failure is skipped silently
        assert torch.equal(dataset[1][0], expected)
    with pytest.raises(ValueError, match=r"unreadable image file .*1\.png"):
        ImageFolderDataset(tmp_path, skip_corrupt=False)  # a new pass sees it at construction


def test_load_time_failure_raises_when_not_skipping(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    dataset = ImageFolderDataset(tmp_path, skip_corrupt=False)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot decode image .*a\.png.*skip_corrupt"):
        dataset[0]


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    levels = np.array([[0, 257 * 100, 65535], [1000, 32896, 65534]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    expected = torch.tensor([[0, 100, 255], [4, 128, 255]], dtype=torch.uint8)
    assert image.shape == (3, 2, 3)
    assert all(torch.equal(channel, expected) for channel in image)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "TIFF"),
        ("1", "BMP"),
        ("RGB", "JPEG"),
    ],
)
def test_any_mode_loads_as_rgb(tmp_path, write_image, mode, fmt):
    path = write_image(tmp_path / "img", mode=mode, fmt=fmt)
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12)


def test_palette_with_transparency_loads_without_warnings(tmp_path):
    image = Image.new("P", (4, 4), 3)
    image.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90])
    image.save(tmp_path / "p.png", transparency=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "p.png")[:, 0, 0].tolist() == [70, 80, 90]
