"""Images as users have them: phone photos with an EXIF orientation, less common extensions,
stray files, and folders full of symbolic links."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dino.data.image_folders import (
    IMG_EXTENSIONS,
    ImageFolderDataset,
    find_image_files,
    load_image,
)
from lightning_dino.io.embed import embed_images

# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright.
ROTATE_CLOCKWISE = 6


def phone_photo(path, orientation=ROTATE_CLOCKWISE):
    """A 40 x 20 (w x h) JPEG stored sideways: left half red, right half blue, as the sensor saw it."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path):
    image = load_image(phone_photo(tmp_path / "IMG_0001.jpg"))
    # Turned clockwise: 20 wide, 40 tall, the stored left (red) half now on top.
    assert image.shape == (3, 40, 20)
    top, bottom = image[:, :18].float().mean(dim=(1, 2)), image[:, 22:].float().mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    upright = load_image(phone_photo(tmp_path / "upright.jpg", orientation=1))
    assert upright.shape == (3, 20, 40)


def test_training_and_embedding_see_the_upright_photo(tmp_path):
    phone_photo((tmp_path / "photos").mkdir() or tmp_path / "photos" / "IMG_0001.jpg")
    image, _ = ImageFolderDataset(tmp_path / "photos")[0]
    assert image.shape == (3, 40, 20)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, batch):
            seen.append(batch)
            return batch.mean(dim=(2, 3))

    embed_images(Recorder(), tmp_path / "photos", tmp_path / "out.safetensors", image_size=20, resize=20,
                 batch_size=1, mean=[0, 0, 0], std=[1, 1, 1])
    # Short side resized to 20 (20 x 40 upright), centre crop 20 x 20: rows 0-9 come from the red
    # (stored left) half, rows 10-19 from the blue half. Sideways, the crop would be split left/right.
    crop = seen[0][0]
    assert crop[0, :8].mean() > 0.8 and crop[2, :8].mean() < 0.2
    assert crop[2, 12:].mean() > 0.8 and crop[0, 12:].mean() < 0.2


def test_less_common_extensions_are_read(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(buffer, format="JPEG")
    (tmp_path / "scan.jfif").write_bytes(buffer.getvalue())
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "scan.tif")
    expected = {"scan.jfif", "scan.tif"}
    if ".avif" in Image.registered_extensions():
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "photo.avif")
        expected.add("photo.avif")
        assert ".avif" in IMG_EXTENSIONS
    found = {os.path.basename(path) for path, _ in find_image_files(tmp_path)}
    assert found == expected
    assert all(load_image(tmp_path / name).shape == (3, 8, 8) for name in expected)


def test_a_symlink_loop_does_not_repeat_images(tmp_path, write_image):
    root = tmp_path / "data"
    for i in range(4):
        write_image(root / "cats" / f"{i}.png")
    os.symlink(root, root / "cats" / "loop")  # a link back to the top
    os.symlink(root / "cats", root / "cats" / "again")  # and one to its own folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(root)
    assert len(dataset) == 4
    assert sorted({os.path.realpath(path) for path, _ in dataset.samples}) == sorted(
        os.path.realpath(root / "cats" / f"{i}.png") for i in range(4))
    messages = [str(w.message) for w in caught]
    assert any("links to folders already read" in m and "loop" in m for m in messages), messages


def test_links_leaving_the_folder_are_followed_and_reported(tmp_path, write_image):
    elsewhere = tmp_path / "shared_disk" / "dogs"
    write_image(elsewhere / "a.png")
    write_image(tmp_path / "data" / "cats" / "b.png")
    os.symlink(elsewhere, tmp_path / "data" / "dogs")
    with pytest.warns(UserWarning, match=r"1 folder link\(s\) under .* lead outside it and were followed"):
        dataset = ImageFolderDataset(tmp_path / "data")
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 2
