"""Bad configuration fails before any data is read, naming the key and the fix; a folder full of
broken image files trains anyway, with one warning and no worker crash."""

import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_dino import DINO
from lightning_dino.cli import main, train
from lightning_dino.data import MultiCropDataModule
from tests.conftest import TINY_VIT, CropData, make_trainer

CONF = Path(__file__).parent / "conf"
TINY_DATA = {"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "global_crop_size": 32,
             "local_crop_size": 16, "n_local_crops": 2, "synthetic_size": 16}


@pytest.fixture
def no_data_reads(monkeypatch):
    """Reading data (prepare_data / setup of the data module) fails the test."""
    def read(self, *args, **kwargs):
        raise AssertionError("the data module read data before the configuration was checked")
    monkeypatch.setattr(MultiCropDataModule, "setup", read)
    monkeypatch.setattr(MultiCropDataModule, "prepare_data", read)
    monkeypatch.setattr(sys, "argv", ["lightning-dino"])


def fit(model_kwargs, data_kwargs, **trainer_kwargs):
    model = DINO(**{**TINY_VIT, **model_kwargs})
    make_trainer(max_steps=1, **trainer_kwargs).fit(model, MultiCropDataModule(**{**TINY_DATA, **data_kwargs}))


def test_unknown_timm_model_lists_close_matches_through_the_cli(no_data_reads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--model.backbone: unknown timm model 'vit_tiny_patch16_22'\. "
                                         r"Close matches: vit_tiny_patch16_224"):
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--model.backbone=vit_tiny_patch16_22"])


def test_crop_size_the_vit_cannot_take_names_the_key_and_a_multiple_of_the_patch(no_data_reads, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    patch16 = "{img_size: 32, patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}"
    with pytest.raises(ValueError, match=r"--data.local_crop_size=12: the backbone cannot take 12x12 crops.*"
                                         r"multiple of the patch size 16, e.g. 16"):
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), f"--model.backbone_kwargs={patch16}",
              "--data.local_crop_size=12"])
    with pytest.raises(ValueError, match=r"MultiCropDataModule\(global_crop_size=36\).*multiple of the patch size 8, "
                                         r"e.g. 32 or 40"):
        fit({}, {"global_crop_size": 36})  # from Python: named as the Python argument


@pytest.mark.parametrize(("model_kwargs", "data_kwargs", "message"), [
    ({"backbone": "test_resnet", "backbone_kwargs": None}, {"batch_size": 1},
     r"MultiCropDataModule\(batch_size=1\): the student has BatchNorm layers"),
    ({"use_bn_in_head": True}, {"batch_size": 1},
     r"MultiCropDataModule\(batch_size=1\): the student has BatchNorm.*DINO\(use_bn_in_head=...\)"),
    ({"n_global_crops": 2}, {"n_global_crops": 1},
     r"MultiCropDataModule\(n_global_crops=1\) but DINO\(n_global_crops=2\)"),
    ({"n_global_crops": 1}, {"n_global_crops": 1, "n_local_crops": 0},
     r"MultiCropDataModule\(n_local_crops=0\) with MultiCropDataModule\(n_global_crops=1\) gives one view"),
])
def test_model_data_mismatch_fails_before_data_is_read(no_data_reads, model_kwargs, data_kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(model_kwargs, data_kwargs)


@pytest.mark.parametrize(("args", "message"), [
    (["--data.n_local_crops=-1"], r"--data.n_local_crops must be >= 0"),
    (["--data.local_crop_scale=[0.0,0.4]"], r"--data.local_crop_scale must satisfy 0 < min <= max <= 1"),
    (["--data.global_crop_scale=[0.4,1.5]"], r"--data.global_crop_scale must satisfy 0 < min <= max <= 1"),
    (["--model.out_dim=1"], r"--model.out_dim=1 is invalid"),
    (["--checkpoint.last_every_n_train_steps=-5"], r"--checkpoint.last_every_n_train_steps must be >= 0"),
])
def test_bad_values_name_the_key_through_the_cli(no_data_reads, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), *args])


def test_koleo_with_one_image_per_device_names_both_flags_before_training(no_data_reads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--model.koleo_loss_weight=0.1 needs at least 2 images per device.*"
                                         r"--data.batch_size=1"):
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--model.koleo_loss_weight=0.1", "--data.batch_size=1"])
    # Batches of another data module: checked on the first batch, before its step.
    model = DINO(**TINY_VIT, koleo_loss_weight=0.1)
    with pytest.raises(ValueError, match=r"DINO\(koleo_loss_weight=0.1\) needs at least 2 images per device"):
        make_trainer(max_steps=1).fit(model, CropData(batch_size=1, n=4))


def test_ibot_with_a_resnet_names_the_flag(no_data_reads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--model.ibot_loss_weight needs patch tokens: ResNet is not a timm ViT"):
        main(["fit", "--config", str(CONF / "tiny_resnet.yaml"), "--model.ibot_loss_weight=1"])


def test_gram_start_step_past_the_run_warns():
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=0, gram_loss_weight=1.0, gram_start_step=5)
    with pytest.warns(UserWarning, match=r"DINO\(gram_start_step=5\) is at or past the run's last step \(2 steps\)"):
        make_trainer(max_epochs=1, limit_train_batches=2).fit(model, CropData(batch_size=4, n=8))


def test_schedules_longer_than_the_run_warn():
    model = DINO(**TINY_VIT, warmup_epochs=10, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    with pytest.warns(UserWarning) as record:
        make_trainer(max_epochs=1, limit_train_batches=2).fit(model, CropData(batch_size=4, n=8))
    messages = " ".join(str(w.message) for w in record)
    assert "DINO(warmup_epochs=10) is 20 steps, as long as the whole run (2 steps)" in messages
    assert "DINO(warmup_teacher_temp_epochs=5) covers the whole run" in messages
    assert "DINO(freeze_last_layer=1) covers the whole run" in messages


def write_broken_files(root, rng):
    """100 unreadable files with image extensions; returns their paths."""
    good_jpeg, good_png = root / "good_0.jpg", root / "good_1.png"
    jpeg, png = good_jpeg.read_bytes(), good_png.read_bytes()
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    huge_png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    kinds = {
        "truncated_jpeg": (".jpg", lambda i: jpeg[: len(jpeg) // 2 + i]),
        "truncated_png": (".png", lambda i: png[: len(png) // 2 + i]),
        "empty": (".jpeg", lambda i: b""),
        "random": (".webp", lambda i: rng.bytes(200 + i)),
        "random_png": (".PNG", lambda i: rng.bytes(64)),
        "huge_png": (".png", lambda i: huge_png),
    }
    broken = []
    for i in range(100):
        kind = list(kinds)[i % len(kinds)]
        suffix, content = kinds[kind]
        path = root / f"broken_{i:03d}_{kind}{suffix}"
        path.write_bytes(content(i))
        broken.append(str(path))
    return broken


@pytest.mark.timeout(120)
def test_100_broken_files_among_40_good_images_train_with_two_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-dino"])
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        pixels = rng.integers(0, 256, (24 + i % 9, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"good_{i}.{'jpg' if i % 2 == 0 else 'png'}")
    broken = write_broken_files(folder, rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = train(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--data.dataset=folder",
                     f"--data.data_dir={folder}", "--data.num_workers=2", "--trainer.logger=false",
                     "--checkpoint.dirpath=checkpoints"])
    assert cli.trainer.global_step == 5  # 40 good images / batch 8: the whole epoch ran
    images = cli.datamodule.train_dataset.dataset
    assert sorted(path for path, _ in images.skipped) == sorted(broken)
    assert len(images) == 40 and not images.failed_at_load
    skipped = [str(w.message) for w in caught if "unreadable image file" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped 100 unreadable image file(s) under {folder}")
