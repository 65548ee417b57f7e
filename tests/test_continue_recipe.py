"""configs/continue_pretrained.yaml: it starts the networks from a released model's weights file,
protects the backbone with the heads-first warm-up, and trains two steps with tiny overrides."""

from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from lightning_dino.cli import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "continue_pretrained.yaml"
TINY = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def test_the_recipe_protects_the_backbone():
    model = yaml.safe_load(CONFIG.read_text())["model"]
    assert model["freeze_backbone_steps"] > 0 and model["backbone_warmup_steps"] > 0
    assert model["backbone"] == "vit_small_patch14_reg4_dinov2" and model["start_from"].endswith(".pth")


def test_the_recipe_trains_two_steps_from_a_released_weights_file(tmp_path):
    released = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **TINY)
    save_file(released.state_dict(), tmp_path / "model.safetensors")
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    cli = train(["fit", "--config", str(CONFIG), "--trainer.accelerator=cpu", "--trainer.precision=32",
                 "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]",
                 "--trainer.enable_progress_bar=false", f"--model.backbone_kwargs={kwargs}",
                 f"--model.start_from={tmp_path / 'model.safetensors'}", "--model.out_dim=64",
                 "--model.hidden_dim=32", "--model.bottleneck_dim=16", "--data.dataset=synthetic",
                 "--data.data_dir=null", "--data.synthetic_size=16", "--data.synthetic_image_size=28",
                 "--data.batch_size=4", "--data.num_workers=0", "--data.global_crop_size=28",
                 "--data.local_crop_size=14", "--data.n_local_crops=2", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    assert cli.trainer.global_step == 2
    for name, value in released.state_dict().items():  # frozen: both backbones are still the released ones
        assert torch.equal(cli.model.student.backbone.state_dict()[name], value), name
        assert torch.equal(cli.model.teacher.backbone.state_dict()[name], value), name
