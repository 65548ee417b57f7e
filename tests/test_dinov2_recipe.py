"""configs/fashion_mnist_dinov2.yaml parses with iBOT and KoLeo on, and trains 2 steps on
Fashion-MNIST (a 256-image subset) with every loss term finite and the k-NN monitor reporting."""

from pathlib import Path

import torch

from lightning_dino.cli import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_dinov2.yaml"


def test_recipe_parses_with_the_dinov2_parts_on():
    cli = train(["--config", str(CONFIG)], run=False)  # run=False: no subcommand
    hp = cli.model.hparams
    assert hp.ibot_loss_weight == 1.0 and hp.koleo_loss_weight == 0.1 and hp.feature_grid == 0
    assert "mask_token" in dict(cli.model.student.named_parameters())
    assert cli.datamodule.hparams.dataset == "fashion_mnist"


def test_recipe_trains_two_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = train(["fit", "--config", str(CONFIG), "--trainer.max_steps=2", "--trainer.logger=false",
                 "--trainer.enable_progress_bar=false", "--data.subset=256", "--data.num_workers=0",
                 f"--checkpoint.dirpath={tmp_path / 'checkpoints'}"])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.status.value == "finished" and trainer.global_step == 2
    for term in ("train/loss", "train/dino_loss", "train/ibot_loss", "train/koleo_loss"):
        assert torch.isfinite(trainer.callback_metrics[term]), term
    assert trainer.callback_metrics["train/ibot_loss"] > 0
    assert torch.count_nonzero(model.ibot.loss.center) > 0  # the patch centre moved
    [knn] = [c for c in trainer.callbacks if type(c).__name__ == "KNNMonitor"]
    assert 0.0 <= knn.last_top1 <= 1.0
