"""Folder embedding: recursive listing, unreadable files, eval transform, order and round trip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.transforms import v2

from lightning_dino import DINO
from lightning_dino.io.embed import embed_images, load_embeddings, paths_file
from lightning_dino.io.export import export_backbone
from tests.conftest import TINY_VIT

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGES = {  # relative path -> (mode, size), in the order embed_images visits them
    "a/one.png": ("RGB", (40, 30)),
    "a/two.PNG": ("L", (32, 48)),
    "b.jpg": ("RGB", (50, 50)),
    "sub/deeper/three.png": ("RGBA", (37, 60)),
}


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return timm.create_model(
        TINY_VIT["backbone"],
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        **TINY_VIT["backbone_kwargs"],
    ).eval()


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, (mode, (w, h)) in IMAGES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode).save(path)
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("not an image")
    return root


def reference_embeddings(backbone, root, size=32):
    """Independent eval transform: RGB, bicubic resize to round(size / 0.875), center crop."""
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(
                round(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    images = torch.stack([transform(Image.open(root / name).convert("RGB")) for name in IMAGES])
    with torch.no_grad():
        return backbone(images)


def test_embeddings_match_backbone_on_transformed_images(backbone, image_dir, tmp_path):
    out_file = tmp_path / "out" / "feats.safetensors"
    with pytest.warns(UserWarning) as record:
        returned = embed_images(backbone, image_dir, out_file, image_size=32, batch_size=3)
    assert returned == out_file
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2  # the unreadable image and the non-image file, each named once
    assert "a/corrupt.png" in messages[1] and "ignored 1 file(s)" in messages[0] and ".txt (1)" in messages[0]
    embeddings, paths = load_embeddings(out_file)
    assert paths == list(IMAGES)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (
        len(IMAGES),
        backbone.num_features,
    )
    torch.testing.assert_close(
        embeddings, reference_embeddings(backbone, image_dir), atol=1e-5, rtol=1e-5
    )
    assert json.loads(paths_file(out_file).read_text())["paths"] == paths
    assert paths_file(out_file).name == "feats.paths.json"
    with safe_open(out_file, framework="pt") as file:
        assert file.metadata()["format"] == "pt" and list(file.keys()) == ["embeddings"]


def test_l2_normalize_and_workers(backbone, image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = load_embeddings(
            embed_images(backbone, image_dir, tmp_path / "raw.safetensors", image_size=32)
        )[0]
        unit = load_embeddings(
            embed_images(
                backbone,
                image_dir,
                tmp_path / "unit.safetensors",
                image_size=32,
                l2_normalize=True,
                num_workers=2,
            )
        )[0]
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(len(IMAGES)))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1))
    assert backbone.training is False


def test_embed_from_export_dir(image_dir, tmp_path):
    model = DINO(**TINY_VIT)
    ckpt = tmp_path / "init.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "epoch": 0,
            "global_step": 0,
        },
        ckpt,
    )
    export = export_backbone(ckpt, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = embed_images(
            export, image_dir, tmp_path / "e.safetensors", image_size=32, device="cpu"
        )
    embeddings, _ = load_embeddings(out)
    expected = reference_embeddings(model.teacher.backbone.eval(), image_dir)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)


def test_errors(backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_images(backbone, tmp_path / "missing", tmp_path / "x.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(FileNotFoundError, match="no image files found"):
        embed_images(backbone, tmp_path / "empty", tmp_path / "x.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    with (
        pytest.warns(UserWarning, match=r"x\.jpg"),
        pytest.raises(ValueError, match="none of the 1 image"),
    ):
        embed_images(backbone, tmp_path / "bad", tmp_path / "x.safetensors", image_size=32)
    assert not (tmp_path / "x.safetensors").exists()


def test_preprocessing_defaults_come_from_the_export(tmp_path):
    from lightning_dino.io.embed import _eval_transform

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(
        '{"pretrained_cfg": {"input_size": [3, 28, 28], "crop_pct": 1.0, "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4]}}'
    )
    transform = _eval_transform(export, None, None, None, None)
    assert (transform.size, transform.resize) == (28, 28)
    assert tuple(transform.mean) == (0.3, 0.3, 0.3) and tuple(transform.std) == (0.4, 0.4, 0.4)
    explicit = _eval_transform(export, 32, None, (0.5, 0.5, 0.5), None)
    assert explicit.size == 32 and tuple(explicit.mean) == (0.5, 0.5, 0.5)
