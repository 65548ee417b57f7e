"""The three DINOv3 recipes, side by side: each parses with DINOv3's values and trains two steps
with tiny overrides (a CPU, a tiny ViT of the same family, synthetic images), each phase starting
from the previous phase's checkpoint as its header says."""

from pathlib import Path

import pytest
import torch
import yaml

from lightning_dino.cli import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32",
        "--trainer.max_steps=2", "--trainer.max_epochs=null", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
        "--model.out_dim=64", "--model.hidden_dim=32", "--model.bottleneck_dim=16", "--model.warmup_epochs=0",
        "--data.dataset=synthetic", "--data.synthetic_size=16", "--data.synthetic_image_size=64",
        "--data.batch_size=4", "--data.num_workers=0", "--data.global_crop_size=32", "--data.local_crop_size=16",
        "--data.n_local_crops=2", "--data.eval_size=32"]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def recipe(name):
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def fit(name, tmp_path, *extra):
    cli = train(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *TINY, *extra,
                 f"--checkpoint.dirpath={tmp_path / name}"])
    assert cli.trainer.global_step == 2
    for key, value in cli.trainer.callback_metrics.items():
        if key.startswith("train/") and key.endswith("loss"):
            assert torch.isfinite(value), key
    return cli, tmp_path / name / "last.ckpt"


def test_the_recipes_carry_dinov3s_values():
    pretrain, gram, high_res = recipe("dinov3_vits16"), recipe("dinov3_vits16_gram"), recipe("dinov3_vits16_high_res")
    for config in (pretrain, gram, high_res):
        model = config["model"]
        assert model["backbone"] == "vit_small_patch16_dinov3" and model["head_weight_norm"] is False
        assert (model["lr_scaling"], model["clip_mode"], model["ibot_mask_rule"], model["centering"]) == (
            "sqrt_wrt_1024", "per_module", "dinov3", "sinkhorn_knopp")
        assert model["rope_rescale_coords"] == 2.0 and config["trainer"]["devices"] == 8
    assert gram["data"]["gram_crop_size"] == 512 and gram["model"]["gram_loss_weight"] == 2.0
    assert gram["model"]["gram_ramp_steps"] == 1000 and gram["model"]["local_loss_weight"] == 0.5
    assert high_res["data"]["crop_size_mix"] == [[512, 112, 768, 0.3], [768, 112, 1152, 0.3], [768, 168, 1152, 0.3],
                                                 [768, 224, 1152, 0.05], [768, 336, 1152, 0.05]]
    assert high_res["data"]["hflip_p"] == 0.0 and high_res["model"]["gram_loss_weight"] == 1.5
    assert high_res["model"]["momentum_teacher"] == high_res["model"]["momentum_teacher_end"] == 0.999


def test_the_three_phases_train_two_steps_each_from_the_previous_one(tmp_path):
    _, pretrained = fit("dinov3_vits16", tmp_path)
    start = [f"--model.start_from={pretrained}", f"--model.gram_teacher_checkpoint={pretrained}"]
    cli, gram_phase = fit("dinov3_vits16_gram", tmp_path, *start, "--data.gram_crop_size=48")
    assert torch.isfinite(cli.trainer.callback_metrics["train/gram_loss"])
    start = [f"--model.start_from={gram_phase}", f"--model.gram_teacher_checkpoint={gram_phase}"]
    mix = "--data.crop_size_mix=[[32, 16, 48, 0.5], [48, 24, 64, 0.5]]"
    cli, _ = fit("dinov3_vits16_high_res", tmp_path, *start, mix, "--model.koleo_group_size=4")
    assert cli.datamodule.size_mix is not None
