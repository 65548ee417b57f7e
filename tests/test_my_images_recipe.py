"""configs/my_images.yaml, the home page's first journey (``lightning-dino fit --config my_images
--data.data_dir DIR``): two steps on a folder of images, with tiny overrides (sizes, the CPU)."""

import pytest
from PIL import Image

from lightning_dino.cli import train
from tests.test_continue_recipe import TINY

pytestmark = pytest.mark.usefixtures("in_tmp_path")


def test_the_recipe_pretrains_two_steps_on_a_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 32), (30 * i, 255 - 30 * i, 90)).save(images / f"{i}.jpg")
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    cli = train(["fit", "--config", "my_images", f"--data.data_dir={images}", "--trainer.accelerator=cpu",
                 "--trainer.precision=32", "--trainer.max_steps=2", "--trainer.logger=false",
                 "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
                 f"--model.backbone_kwargs={kwargs}", "--model.out_dim=64", "--model.hidden_dim=32",
                 "--model.bottleneck_dim=16", "--data.batch_size=4", "--data.num_workers=0",
                 "--data.global_crop_size=28", "--data.local_crop_size=14", "--data.n_local_crops=2",
                 f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.hparams.data_dir == str(images)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
