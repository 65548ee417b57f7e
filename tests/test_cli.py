import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dino import cli as cli_module
from lightning_dino.cli import main

CONF = Path(__file__).parent / "conf"


@pytest.fixture
def built(monkeypatch):
    """The LightningCLI objects that `main` builds (it returns nothing), to inspect their runs."""
    clis = []
    real_train = cli_module.train

    def recording_train(*args, **kwargs):
        clis.append(real_train(*args, **kwargs))
        return clis[-1]

    monkeypatch.setattr(cli_module, "train", recording_train)
    return clis


def assert_one_training_step(cli):
    """fast_dev_run took exactly one optimizer step: the student left its teacher copy."""
    trainer, model = cli.trainer, cli.model
    assert trainer.state.status.value == "finished" and trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # Student and teacher start identical; after one step (no lr warmup in the tiny configs) the
    # student moved, and the teacher (momentum 0.996) only 0.4% of the way towards it.
    gaps = [(s - t).abs().max().item() for s, t in zip(model.student.parameters(), model.teacher.parameters(),
                                                       strict=True)]
    assert max(gaps) > 1e-6


@pytest.mark.parametrize("config", ["tiny_vit.yaml", "tiny_resnet.yaml"])
def test_fit_fast_dev_run(config, tmp_path, monkeypatch, built):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / config), "--trainer.fast_dev_run=true"])
    [cli] = built
    assert cli.model.hparams.backbone == ("vit_tiny_patch16_224" if "vit" in config else "test_resnet")
    assert_one_training_step(cli)
    assert not (tmp_path / "runs").exists()  # fast_dev_run writes no logs or checkpoints


def test_fit_writes_tensorboard_and_checkpoints_each_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1",
          "--trainer.callbacks+=lightning_dino.eval.KNNMonitor",
          "--trainer.callbacks+=lightning_dino.eval.AttentionMapMonitor"])
    version = tmp_path / "runs" / "dino" / "version_0"
    checkpoints = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert checkpoints == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "vit_tiny_patch16_224"

    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss", "train/lr", "train/weight_decay", "train/teacher_momentum", "train/teacher_temp",
        "train/images_per_sec", "diagnostics/teacher_entropy", "diagnostics/teacher_entropy_ratio",
        "diagnostics/teacher_student_kl", "diagnostics/center_norm", "knn/top1", "knn/top5",
    }
    assert expected <= scalars, expected - scalars
    assert {"train/crops", "attention/maps"} <= set(events.Tags()["images"])


def test_print_config_parses_back(tmp_path, monkeypatch, capsys, built):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["out_dim"] == 64
    assert config["model"]["momentum_teacher"] == 0.996
    assert config["data"]["batch_size"] == 8
    (tmp_path / "printed.yaml").write_text(printed)
    main(["fit", "--config", str(tmp_path / "printed.yaml"), "--trainer.fast_dev_run=true"])
    [cli] = built
    assert cli.model.hparams.out_dim == 64 and cli.datamodule.hparams.batch_size == 8
    assert_one_training_step(cli)


def test_python_m_and_console_script_help():
    def run(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout

    # The overview: the training subcommand and every tool, one per line with its description,
    # but not the (2000-line) list of fit's keys.
    overview = run(sys.executable, "-m", "lightning_dino", "--help")
    assert overview.startswith("lightning-dino ")
    for command in ("fit", *cli_module.TOOLS):
        assert re.search(rf"^  {command} +\S", overview, re.MULTILINE), f"{command} missing from the overview"
    assert "--model.teacher_temp" not in overview
    # fit's own help, from the console script: the model, data and trainer keys.
    fit_help = run(str(Path(sys.executable).parent / "lightning-dino"), "fit", "--help")
    assert fit_help.startswith("usage: lightning-dino [options] fit")
    for key in ("--model.teacher_temp TEACHER_TEMP", "--model.momentum_teacher", "--data.batch_size",
                "--trainer.max_epochs"):
        assert key in fit_help, key
    assert not any(re.search(rf"^  {tool} +\S", fit_help, re.MULTILINE) for tool in cli_module.TOOLS)


def test_bad_model_key_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--model.teacher_tmp=0.05"])
    assert "teacher_tmp" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in (CONF.parent.parent / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config, capsys):
    configs = CONF.parent.parent / "configs"
    args = ["fit", "--config", str(configs / config)]
    if config == "imagenet_vits16_paper.yaml":  # an overlay on top of the vanilla recipe
        args = ["fit", "--config", str(configs / "imagenet_vits16.yaml"), "--config", str(configs / config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model.get("init_args", model)["backbone"]  # a class_path config nests its arguments


def test_quickstart_time_cap_stops_early_with_a_checkpoint_the_knn_step_reads(tmp_path, monkeypatch, built):
    """`make quickstart` on a slow machine: max_time ends training, last.ckpt is there for `knn`."""
    quickstart = yaml.safe_load((Path(__file__).parents[1] / "configs/quickstart.yaml").read_text())
    assert quickstart["trainer"]["max_time"] == "00:00:12:00"  # the README's promise
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / "tiny_resnet.yaml"), "--trainer.max_epochs=1000",
          "--trainer.max_time=00:00:00:04"])
    [cli] = built
    assert 0 < cli.trainer.global_step < 1000 * cli.trainer.num_training_batches
    [last] = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == cli.trainer.global_step
    main(["knn", "--ckpt", str(last), "--config", str(CONF / "tiny_resnet.yaml")])
