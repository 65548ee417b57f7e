"""configs/distill_my_images.yaml: a released timm teacher read from a local weights file, distilled
into a ResNet on a folder of images; two steps with tiny overrides (the folder, the sizes)."""

from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from lightning_dino.cli import train
from tests.test_continue_recipe import TINY

pytestmark = pytest.mark.usefixtures("in_tmp_path")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "distill_my_images.yaml"


def test_the_recipe_reads_a_local_teacher_file():
    model = yaml.safe_load(CONFIG.read_text())["model"]
    assert model["class_path"] == "lightning_dino.Distillation"
    kwargs = model["init_args"]["teacher_kwargs"]
    assert kwargs["pretrained"] and kwargs["pretrained_cfg_overlay"]["file"].endswith(".safetensors")


def test_the_recipe_distils_two_steps_on_a_folder(tmp_path):
    released = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **TINY)
    save_file(released.state_dict(), tmp_path / "teacher.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 32), (30 * i, 255 - 30 * i, 90)).save(images / f"{i}.jpg")
    teacher_kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items())
    teacher_kwargs += f", pretrained: true, pretrained_cfg_overlay: {{file: {tmp_path / 'teacher.safetensors'}}}}}"
    cli = train(["fit", "--config", str(CONFIG), "--trainer.accelerator=cpu", "--trainer.precision=32",
                 "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]",
                 "--trainer.enable_progress_bar=false", f"--model.teacher_kwargs={teacher_kwargs}",
                 "--model.teacher_image_size=28", "--model.backbone=test_resnet", f"--data.data_dir={images}",
                 "--data.batch_size=4", "--data.num_workers=0", "--data.global_crop_size=28",
                 "--data.val_fraction=0", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    assert cli.trainer.global_step == 2
    for name, value in released.state_dict().items():  # the frozen teacher is the file's
        assert torch.equal(cli.model.teacher.backbone.state_dict()[name], value), name
