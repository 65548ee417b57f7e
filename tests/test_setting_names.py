"""Messages name a setting the way its caller set it: `DINO(lr=...)` from Python, `--model.lr` from
the `lightning-dino` command, and the Python way again once the command has returned or raised."""

from pathlib import Path

import pytest

from lightning_dino import DINO
from lightning_dino.cli import main, train
from lightning_dino.data import MultiCropDataModule
from lightning_dino.setting_names import cli_flags, setting, using_cli
from tests.conftest import TINY_VIT, CropData, make_trainer

CONF = Path(__file__).parent / "conf"
CONFIG = ["--config", str(CONF / "tiny_vit.yaml")]
FIT = ["fit", *CONFIG]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


@pytest.mark.parametrize(("args", "python", "cli"), [
    (("model", "warmup_epochs", 0.5), "DINO(warmup_epochs=0.5)", "--model.warmup_epochs=0.5"),
    (("data", "batch_size"), "MultiCropDataModule(batch_size=...)", "--data.batch_size"),
    (("data", "dataset", "folder"), "MultiCropDataModule(dataset='folder')", "--data.dataset=folder"),
    (("data", "download", True), "MultiCropDataModule(download=True)", "--data.download=true"),
    (("trainer", "precision", "bf16-mixed"), "Trainer(precision='bf16-mixed')", "--trainer.precision=bf16-mixed"),
    (("checkpoint", "dirpath", Path("ckpts")), "DINOCheckpoint(dirpath='ckpts')", "--checkpoint.dirpath=ckpts"),
    (("Trainer.fit", "ckpt_path"), "Trainer.fit(ckpt_path=...)", "--ckpt_path"),
    (("prepare_streaming_dataset", "out", Path("prepared")), "prepare_streaming_dataset(out='prepared')",
     "--out=prepared"),
])
def test_setting_names_the_python_argument_or_the_flag(args, python, cli):
    assert not using_cli()
    assert setting(*args) == python
    with cli_flags():
        assert using_cli()
        assert setting(*args) == cli
    assert setting(*args) == python


def test_the_flag_style_is_restored_after_an_error_and_when_nested():
    with pytest.raises(RuntimeError), cli_flags():
        with cli_flags():
            pass
        assert using_cli()  # leaving the inner block keeps the outer one's style
        raise RuntimeError
    assert not using_cli()


@pytest.mark.parametrize(("make", "args", "python", "cli"), [
    (lambda: DINO(**{**TINY_VIT, "out_dim": 1}), ["--model.out_dim=1"], r"DINO\(out_dim=1\) is invalid",
     r"--model\.out_dim=1 is invalid"),
    (lambda: MultiCropDataModule(batch_size=0), ["--data.batch_size=0"],
     r"MultiCropDataModule\(batch_size=\.\.\.\) must be >= 1", r"--data\.batch_size must be >= 1"),
    # A check of the crop transform, re-raised by the data module under the argument's name.
    (lambda: MultiCropDataModule(local_crop_scale=(0.0, 0.4)), ["--data.local_crop_scale=[0.0,0.4]"],
     r"MultiCropDataModule\(local_crop_scale=\.\.\.\) must satisfy", r"--data\.local_crop_scale must satisfy"),
])
def test_a_bad_setting_is_named_as_the_caller_set_it(make, args, python, cli):
    with pytest.raises(ValueError, match=python):
        make()
    with pytest.raises(ValueError, match=cli):
        train([*CONFIG, *args], run=False)
    # Python again after the command raised: the style does not leak out of the CLI.
    with pytest.raises(ValueError, match=python):
        make()


def test_python_names_again_after_a_cli_run():
    train(CONFIG, run=False)
    assert not using_cli()
    main([*FIT, "--trainer.fast_dev_run=true"])
    assert not using_cli()
    with pytest.raises(ValueError, match=r"DINO\(out_dim=1\) is invalid"):
        DINO(**{**TINY_VIT, "out_dim": 1})


def test_a_warning_names_the_setting_as_the_caller_set_it():
    with pytest.warns(UserWarning, match=r"DINO\(warmup_epochs=10\) is 20 steps, as long as the whole run"):
        make_trainer(max_epochs=1, limit_train_batches=2).fit(DINO(**TINY_VIT, warmup_epochs=10),
                                                              CropData(batch_size=4, n=8))
    with pytest.warns(UserWarning, match=r"--model\.warmup_epochs=10\.0 is 40 steps, as long as the whole run"):
        main([*FIT, "--model.warmup_epochs=10", "--trainer.limit_train_batches=4", "--trainer.logger=false",
              "--checkpoint.dirpath=checkpoints"])


def test_messages_name_the_class_the_user_built():
    import timm

    from lightning_dino import Distillation

    teacher = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(ValueError, match=r"^Distillation\(backbone=\.\.\.\): unknown timm model"):
        Distillation(teacher, backbone="resnet_no_such_model")
    with pytest.raises(ValueError, match=r"^Distillation\(lr=0\) is invalid"):
        Distillation(teacher, backbone="test_resnet", lr=0)
    with pytest.raises(ValueError, match=r"^Distillation\(feature_grid=\.\.\.\) needs a ViT with a class token"):
        Distillation(teacher, backbone="vit_tiny_patch16_224", feature_grid=2,
                     backbone_kwargs={"class_token": False, "global_pool": "avg", "img_size": 32})
    with pytest.raises(ValueError, match=r"^DINO\(backbone=\.\.\.\): unknown timm model"):
        DINO(backbone="resnet_no_such_model")
    with cli_flags(), pytest.raises(ValueError, match=r"^--model\.backbone: unknown timm model"):
        Distillation(teacher, backbone="resnet_no_such_model")
