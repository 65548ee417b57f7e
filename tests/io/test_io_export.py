"""Backbone export: plain-timm round trip, key hygiene, teacher/student, loading, errors."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_dino import DINO
from lightning_dino.io.export import export_backbone, load_backbone
from lightning_dino.networks.backbones import use_grid_pooling
from tests.conftest import TINY_VIT, CropData, make_trainer

TINY_RESNET = {"backbone": "test_resnet", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
FORBIDDEN_PREFIXES = ("teacher.", "student.", "backbone.", "module.")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class Opaque:
    """Any class: a checkpoint holding one can only be read by unpickling code."""


def plain_timm(export_dir: Path) -> nn.Module:
    """What a user without lightning_dino runs (see the export module docstring)."""
    cfg = json.loads((export_dir / "config.json").read_text())
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(export_dir / "model.safetensors"), num_classes=0, custom_load=False
        ),
        num_classes=0,
        **cfg["model_args"],
    ).eval()
    if "feature_grid" in cfg:  # the documented extra step for grid-pooled runs
        use_grid_pooling(model, cfg["feature_grid"])
    return model


@pytest.fixture(scope="module", params=["vit", "vit_grid", "resnet", "resnet_grid"])
def trained(request, tmp_path_factory):
    """A DINO run of 2 steps whose teacher (momentum 0.5) differs from its student."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    kwargs = {
        "vit": TINY_VIT,
        "vit_grid": {**TINY_VIT, "feature_grid": 2},
        "resnet": TINY_RESNET,
        "resnet_grid": {**TINY_RESNET, "feature_grid": 2},
    }[request.param]
    torch.manual_seed(0)
    model = DINO(**kwargs, momentum_teacher=0.5, warmup_epochs=0)
    trainer = make_trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, CropData(global_size=32, local_size=16))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    model.eval()
    return model, ckpt, tmp_path


def features(backbone: nn.Module, size: int) -> torch.Tensor:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        return backbone.eval()(images)


@pytest.mark.parametrize("size", [32, 16])
def test_plain_timm_round_trip_matches_teacher(trained, size):
    model, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "export")
    assert out == tmp_path / "export"
    torch.testing.assert_close(
        features(plain_timm(out), size), features(model.teacher.backbone, size), atol=1e-6, rtol=0
    )


def test_keys_tensors_and_metadata(trained):
    model, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "keys")
    state = load_file(out / "model.safetensors")
    assert not [key for key in state if key.startswith(FORBIDDEN_PREFIXES)]
    assert set(state) == set(model.teacher.backbone.state_dict())
    for key, value in model.teacher.backbone.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    with safe_open(out / "model.safetensors", framework="pt") as file:
        assert file.metadata()["format"] == "pt"


def test_config(trained):
    model, ckpt, tmp_path = trained
    cfg = json.loads((export_backbone(ckpt, tmp_path / "cfg") / "config.json").read_text())
    saved = torch.load(ckpt, weights_only=True)
    assert cfg["architecture"] == model.hparams.backbone
    assert cfg["num_features"] == model.teacher.backbone.num_features
    assert cfg["source"] == "teacher"
    assert cfg["global_step"] == saved["global_step"] == 2
    assert cfg["epoch"] == saved["epoch"]
    assert "drop_path_rate" not in cfg["model_args"]
    if model.hparams.backbone.startswith("vit"):
        assert cfg["model_args"] == {**TINY_VIT["backbone_kwargs"], "dynamic_img_size": True}
        assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    else:
        assert cfg["model_args"] == {}


def test_preprocessing_config_follows_the_data_module(tmp_path):
    model = DINO(**TINY_VIT)
    data = {
        "global_crop_size": 48,
        "eval_size": None,
        "eval_resize": 64,
        "mean": (0.2, 0.2, 0.2),
        "std": (0.3, 0.3, 0.3),
    }
    ckpt = tmp_path / "with_data.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": data,
        },
        ckpt,
    )
    cfg = json.loads((export_backbone(ckpt, tmp_path / "out") / "config.json").read_text())[
        "pretrained_cfg"
    ]
    assert cfg["input_size"] == [3, 48, 48] and cfg["crop_pct"] == 48 / 64
    assert cfg["mean"] == [0.2] * 3 and cfg["std"] == [0.3] * 3
    assert cfg["num_classes"] == 0 and cfg["fixed_input_size"] is False


def test_student_export_differs_from_teacher(trained):
    model, ckpt, tmp_path = trained
    teacher = plain_timm(export_backbone(ckpt, tmp_path / "t"))
    student_dir = export_backbone(ckpt, tmp_path / "s", which="student")
    student = plain_timm(student_dir)
    assert json.loads((student_dir / "config.json").read_text())["source"] == "student"
    torch.testing.assert_close(
        features(student, 32), features(model.student.backbone, 32), atol=1e-6, rtol=0
    )
    assert not torch.allclose(features(student, 32), features(teacher, 32), atol=1e-4)


def test_timm_local_dir_loads_the_export(trained):
    model, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "local")
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    if model.hparams.feature_grid:
        use_grid_pooling(backbone, model.hparams.feature_grid)
    torch.testing.assert_close(
        features(backbone, 32), features(model.teacher.backbone, 32), atol=1e-6, rtol=0
    )


def test_load_backbone_from_export_and_checkpoint(trained):
    model, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "load")
    expected = features(model.teacher.backbone, 32)
    for source in (out, out / "model.safetensors", ckpt):
        backbone = load_backbone(source)
        assert backbone.training and all(p.requires_grad for p in backbone.parameters())  # as timm.create_model
        torch.testing.assert_close(features(backbone, 32), expected, atol=1e-6, rtol=0)
    student = load_backbone(ckpt, which="student")
    torch.testing.assert_close(
        features(student, 32), features(model.student.backbone, 32), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="holds the teacher backbone, not the student"):
        load_backbone(out, which="student")


def test_loading_is_strict(trained):
    _, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "broken")
    state = load_file(out / "model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_backbone(out)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_backbone(tmp_path / "nope.ckpt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_backbone(tmp_path)


def test_not_a_dino_checkpoint(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(ValueError, match=r"not a lightning_dino DINO checkpoint.*\['model'\]"):
        export_backbone(ckpt, tmp_path / "out")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.ckpt is not a readable checkpoint: the file is truncated"):
        export_backbone(tmp_path / "garbage.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}, "callbacks": Opaque()}, tmp_path / "code.ckpt")
    with pytest.raises(ValueError, match=r"safe loading \(weights_only=True\) refuses") as error:
        export_backbone(tmp_path / "code.ckpt", tmp_path / "out")
    assert "weights_only=False" not in str(error.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        export_backbone(tmp_path / "plain.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_custom_module_backbone_exports_weights_with_a_hint(tmp_path):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = DINO(backbone, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    ckpt = tmp_path / "custom.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "epoch": 0,
            "global_step": 0,
        },
        ckpt,
    )
    with pytest.warns(UserWarning, match=r"custom nn\.Module.*load_state_dict"):
        out = export_backbone(ckpt, tmp_path / "custom")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] is None and cfg["num_features"] == 8
    rebuilt = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rebuilt.load_state_dict(load_file(out / "model.safetensors"))
    torch.testing.assert_close(
        features(rebuilt, 16), features(model.teacher.backbone, 16), atol=1e-6, rtol=0
    )
    for source in (out, ckpt):
        with pytest.raises(ValueError, match=r"custom nn\.Module"):
            load_backbone(source)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST idx files not installed")
@pytest.mark.parametrize("trained", ["vit"], indirect=True)
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_finetune_example_runs(trained, monkeypatch):
    _, ckpt, tmp_path = trained
    out = export_backbone(ckpt, tmp_path / "example")
    script = Path(__file__).parents[2] / "examples" / "finetune_exported_backbone.py"
    argv = [
        str(script),
        "--export",
        str(out),
        "--epochs",
        "1",
        "--limit",
        "32",
        "--out",
        str(tmp_path / "ft"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "ft").is_dir()
