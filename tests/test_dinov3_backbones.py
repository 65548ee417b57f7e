"""timm's DINOv3 architecture (Eva: rotary positions, registers, LayerScale) trains with every
term through the one token forward, pools its class token as DINOv3 does, evaluates (k-NN,
attention maps) and exports to plain timm."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_dino import (
    DINO,
    AttentionMapMonitor,
    KNNMonitor,
    MultiCropDataModule,
    export_backbone,
    load_backbone,
)
from lightning_dino.eval.attention import attention_maps
from lightning_dino.networks.backbones import use_standard_pooling
from tests.conftest import make_trainer

EVA = {"backbone": "vit_small_patch16_dinov3",
       "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
       "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_epochs": 0, "drop_path_rate": 0.0}
DATA = {"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "global_crop_size": 32, "local_crop_size": 16,
        "n_local_crops": 2, "synthetic_size": 16, "synthetic_image_size": 32}


def test_the_class_token_is_the_feature_as_in_dinov3():
    backbone = DINO(**EVA).teacher.backbone.eval()
    assert type(backbone).__name__ == "Eva" and backbone.global_pool == "token"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), backbone.forward_features(images)[:, 0])
    # The user's own pooling wins.
    avg = DINO(**{**EVA, "backbone_kwargs": {**EVA["backbone_kwargs"], "global_pool": "avg"}}).teacher.backbone
    assert avg.global_pool == "avg"


def test_every_term_trains_on_the_dinov3_architecture(tmp_path):
    model = DINO(**EVA, ibot_loss_weight=1.0, koleo_loss_weight=0.1, gram_loss_weight=1.0, gram_start_step=1,
                 gram_update_every=1, ibot_separate_head=True, monitors=False)
    knn, attention = KNNMonitor(k=3), AttentionMapMonitor(n_images=2)
    trainer = make_trainer(max_epochs=2, callbacks=[knn, attention], log_every_n_steps=1)
    trainer.fit(model, MultiCropDataModule(**DATA))
    metrics = trainer.callback_metrics
    for key in ("train/dino_loss", "train/ibot_loss", "train/koleo_loss", "train/gram_loss"):
        assert torch.isfinite(metrics[key]), key
    assert torch.count_nonzero(model.ibot.loss.center) > 0
    assert "knn/top1" in metrics
    assert attention.last_grid is not None
    assert not torch.equal(model.teacher.backbone.blocks[0].attn.qkv.weight,
                           DINO(**EVA).teacher.backbone.blocks[0].attn.qkv.weight)


def test_feature_grid_trains_and_the_standard_protocol_gives_the_class_token():
    model = DINO(**EVA, feature_grid=2, monitors=False)
    assert model.student.backbone.num_features == 32 * 5
    make_trainer(max_steps=2).fit(model, MultiCropDataModule(**DATA))
    backbone = use_standard_pooling(model.teacher.backbone).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), backbone.forward_features(images)[:, 0])


def test_attention_maps_of_eva_equal_an_independent_computation_with_rotary_positions():
    torch.manual_seed(0)
    vit = DINO(**EVA).teacher.backbone.eval()
    images = torch.randn(2, 3, 32, 40)
    maps = attention_maps(vit, images)
    # By hand: the last block's input, its qkv, rotary positions on the patch keys (half-split
    # layout, DINOv3's rotate_half), the CLS query's softmax over all keys, patch keys renormalised.
    seen = {}
    block = vit.blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    with torch.no_grad():
        vit(images)
        handle.remove()
        x = block.norm1(seen["x"])
        attn, heads, prefix = block.attn, block.attn.num_heads, vit.num_prefix_tokens
        q, k, _ = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(2, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        sin, cos = vit.rope.get_embed(shape=(4, 5)).chunk(2, -1)
        patches = k[:, :, prefix:]
        half = patches.shape[-1] // 2
        rotated = torch.cat([-patches[..., half:], patches[..., :half]], -1)
        k = torch.cat([k[:, :, :prefix], patches * cos + rotated * sin], 2)
        probs = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, prefix:]
    want = (probs / probs.sum(-1, keepdim=True)).reshape(2, heads, 4, 5)
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-6)


def test_exports_to_plain_timm_with_the_class_token(tmp_path):
    model = DINO(**EVA)
    ckpt = tmp_path / "run.ckpt"
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, MultiCropDataModule(**DATA))
    trainer.save_checkpoint(ckpt)
    out = export_backbone(ckpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_dinov3"
    assert config["model_args"]["global_pool"] == "token"
    plain = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model.eval()(images))
        torch.testing.assert_close(load_backbone(ckpt).eval()(images), model(images))


@pytest.mark.parametrize("option", ["ibot_loss_weight", "gram_loss_weight"])
def test_a_backbone_without_tokens_fails_when_built_naming_it_and_the_option(option):
    with pytest.raises(ValueError, match=rf"DINO\({option}=\.\.\.\) needs patch tokens: ResNet is not a timm ViT"):
        DINO(backbone="test_resnet", out_dim=16, hidden_dim=8, bottleneck_dim=4, **{option: 1.0})
