"""The command-line tools on a checkpoint of a tiny run, through `lightning-dino TOOL ...`."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_dino.cli import main

CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    argv = sys.argv
    sys.argv = ["lightning-dino"]
    try:
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--trainer.limit_train_batches=2",
              f"--trainer.logger.init_args.save_dir={root}"])
    finally:
        sys.argv = argv
    return root / "dino" / "version_0" / "checkpoints" / "last.ckpt"


def test_knn_command_prints_accuracy(tiny_run, capsys):
    main(["knn", "--ckpt", str(tiny_run), "--config", str(CONF / "tiny_vit.yaml"), "--k", "5"])
    out = capsys.readouterr().out
    # The config's data section is used (32 synthetic images), not the data module's defaults.
    assert "k-NN (evaluated network, trained pooling, k=5, T=0.07, 32 train" in out and "top-1" in out
    main(["knn", "--ckpt", str(tiny_run), "--config", str(CONF / "tiny_vit.yaml"), "--k", "5",
          "--pooling", "standard"])
    assert "standard pooling" in capsys.readouterr().out


def test_probe_command(tiny_run, capsys):
    main(["probe", "--ckpt", str(tiny_run), "--config", str(CONF / "tiny_vit.yaml"), "--epochs", "2",
          "--accelerator", "cpu"])
    assert "linear probe (evaluated network, 2 epochs): best top-1" in capsys.readouterr().out


def test_attention_command_writes_png(tiny_run, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps.png"
    main(["attention", "--ckpt", str(tiny_run), "--image", str(image), "--out", str(out), "--threshold", "0.6"])
    assert out.is_file() and Image.open(out).size[0] > 0


def test_export_command(tiny_run, tmp_path):
    main(["export", "--ckpt", str(tiny_run), "--out", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_tool_help_lists_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["knn", "--help"])
    out = capsys.readouterr().out
    assert "--ckpt" in out and "--temperature" in out
