import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino.eval import LinearProbe, fit_linear_probe, probe_features


def separable_loaders(num_classes=4, dim=8, n_train=256, n_val=64):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(num_classes, dim, generator=gen) * 3

    def split(n):
        labels = torch.arange(n) % num_classes
        return TensorDataset(centres[labels] + 0.3 * torch.randn(n, dim, generator=gen), labels)

    train = DataLoader(split(n_train), batch_size=32, shuffle=True)
    return train, DataLoader(split(n_val), batch_size=32)


def frozen_projection():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5))


def test_fit_linear_probe_separable():
    backbone = frozen_projection()
    weights = backbone[0].weight.detach().clone()
    train, val = separable_loaders()
    result = fit_linear_probe(
        backbone, train, val, num_classes=4, epochs=3, lr=2.0, accelerator="cpu", feature_dim=16
    )
    assert result["last_top1"] >= 0.98
    assert result["best_top1"] >= result["last_top1"]
    assert torch.equal(backbone[0].weight, weights)


@pytest.mark.filterwarnings("ignore:.*in eval mode")
def test_probe_optimizer_lr_checkpoint(tmp_path):
    backbone = frozen_projection()
    probe = LinearProbe(backbone, num_classes=4, lr=0.001, feature_dim=16)
    assert probe.classifier.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert (probe.classifier.bias == 0).all()
    train, val = separable_loaders()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
    )
    trainer.fit(probe, train, val)
    optimizer = trainer.optimizers[0]
    assert [p for group in optimizer.param_groups for p in group["params"]] == list(
        probe.classifier.parameters()
    )
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.001 * 32 * 2 / 256)
    assert not backbone.training and not backbone[0].weight.requires_grad
    assert "probe/val_top1" in trainer.callback_metrics
    assert "probe/train_loss" in trainer.callback_metrics
    assert probe.last_val_top1 == pytest.approx(trainer.callback_metrics["probe/val_top1"].item())

    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    state = torch.load(tmp_path / "probe.ckpt", weights_only=False)["state_dict"]
    assert set(state) == {"classifier.weight", "classifier.bias"}
    restored = LinearProbe.load_from_checkpoint(
        tmp_path / "probe.ckpt", backbone=frozen_projection()
    )
    torch.testing.assert_close(restored.classifier.weight, probe.classifier.weight)


def test_vit_features_are_normed_cls_of_last_blocks():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    probe = LinearProbe(vit, num_classes=3)
    assert probe.feature_mode == "last4_cls"
    assert probe.classifier.in_features == 2 * 192  # depth 2 < 4: both blocks
    with torch.no_grad():
        features = probe_features(vit, images, "last4_cls")
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        first = vit.norm(vit.blocks[0](tokens))[:, 0]
        torch.testing.assert_close(features[:, :192], first)
        torch.testing.assert_close(features[:, 192:], vit(images))
        torch.testing.assert_close(probe_features(vit, images, "cls"), vit(images))
    assert probe(images).shape == (2, 3)


def test_resnet_uses_pooled_features_and_cls_is_rejected():
    resnet = timm.create_model("test_resnet", num_classes=0)
    probe = LinearProbe(resnet, num_classes=5)
    assert probe.feature_mode == "pooled"
    assert probe.classifier.in_features == resnet.num_features
    with pytest.raises(ValueError, match="needs a timm VisionTransformer with a class token"):
        LinearProbe(resnet, num_classes=5, feature_mode="cls")
    with pytest.raises(ValueError, match="pass feature_dim"):
        LinearProbe(nn.Identity(), num_classes=5)
