"""Grid pooling: a CNN's last map (or a ViT's patch tokens) averaged to a g x g grid and flattened."""

import pytest
import timm
import torch

from lightning_dino import DINO
from lightning_dino.networks.backbones import (
    GridPool,
    create_timm_backbone,
    feature_grid_of,
    use_grid_pooling,
    use_standard_pooling,
)


def test_grid_pool_values_against_quadrant_means():
    fmap = torch.randn(2, 3, 4, 6)
    out = GridPool(2)(fmap)
    expected = torch.stack(
        [fmap[:, :, r * 2 : r * 2 + 2, c * 3 : c * 3 + 3].mean((2, 3)) for r in range(2) for c in range(2)],
        dim=2,
    ).flatten(1)  # channel-major: (B, C, 4 cells) -> (B, C * 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(GridPool(1)(fmap), fmap.mean((2, 3)))


def test_timm_resnet_with_grid_pooling_keeps_layout_and_size():
    torch.manual_seed(0)
    model = create_timm_backbone("resnet18", backbone_kwargs={"channels": [8, 8, 8, 16]}, feature_grid=2).eval()
    assert model.num_features == 16 * 4
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(images)  # (3, 16, 2, 2): the grid is the map itself
        torch.testing.assert_close(model(images), fmap.flatten(1))
        # crops of other sizes give the same feature size, so global and local crops share the head
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 64)
    flipped = images.flip(-1)
    with torch.no_grad():
        assert not torch.allclose(model(flipped), model(images))  # position matters, unlike avg


def test_state_dict_is_plain_timm():
    model = create_timm_backbone("resnet18", backbone_kwargs={"channels": [8, 8, 8, 16]}, feature_grid=2)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 16])
    plain.load_state_dict(model.state_dict(), strict=True)


def test_dino_head_takes_the_grid_features():
    model = DINO(backbone="resnet18", backbone_kwargs={"channels": [8, 8, 8, 16]}, feature_grid=3, out_dim=32,
                 hidden_dim=16, bottleneck_dim=8)
    assert model.student.head.mlp[0].in_features == 16 * 9
    assert model.hparams.feature_grid == 3
    logits = model.student([torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)])
    assert logits.shape == (2, 2, 32)


TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 1}


def test_vit_grid_is_class_token_then_patch_quadrant_means():
    torch.manual_seed(0)
    model = create_timm_backbone("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT_KWARGS, feature_grid=2).eval()
    assert model.num_features == 16 * 5
    assert feature_grid_of(model) == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)  # (2, 1 + 16, 16): class token, then a 4x4 patch map
        out = model(images)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 80)  # a local crop: 2x2 patches
    patches = tokens[:, 1:].reshape(2, 4, 4, 16)  # row-major patch order
    quadrants = [patches[:, r * 2 : r * 2 + 2, c * 2 : c * 2 + 2].mean((1, 2)) for r in range(2) for c in range(2)]
    expected = torch.cat([tokens[:, 0], torch.stack(quadrants, dim=2).flatten(1)], dim=1)  # channel-major grid
    torch.testing.assert_close(out, expected)


def test_vit_grid_state_dict_is_plain_timm():
    model = create_timm_backbone("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT_KWARGS, feature_grid=2)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT_KWARGS)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert feature_grid_of(plain) == 0


def test_errors_name_the_key():
    no_class_token = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, class_token=False,
                                       global_pool="avg", **TINY_VIT_KWARGS)
    with pytest.raises(ValueError, match=r"DINO\(feature_grid=...\) needs a ViT with a class token"):
        use_grid_pooling(no_class_token, 2)
    with pytest.raises(ValueError, match=r"DINO\(feature_grid=...\) needs a CNN"):
        use_grid_pooling(torch.nn.Linear(3, 3), 2)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    with pytest.raises(ValueError, match=r"DINO\(feature_grid=...\) must be >= 1"):
        use_grid_pooling(resnet, -1)


def test_feature_grid_with_a_custom_module_is_an_error_not_ignored():
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    with pytest.raises(ValueError, match=r"DINO\(feature_grid=...\) applies to timm backbones given by name"):
        DINO(backbone=backbone, feature_grid=2, out_dim=32, hidden_dim=16, bottleneck_dim=8)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_standard_pooling_gives_the_plain_models_features(name):
    """After use_standard_pooling a grid-pooled model gives what the paper's protocol reads: a
    CNN's global average of its last map, a ViT's class token; the same as the plain timm model
    with the same weights."""
    kwargs = ({"channels": [8, 8, 8, 16]} if name == "resnet18"
              else {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2})
    torch.manual_seed(0)
    model = create_timm_backbone(name, backbone_kwargs=kwargs, feature_grid=2).eval()
    plain = timm.create_model(name, num_classes=0, **kwargs).eval()
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert use_standard_pooling(model) is model and feature_grid_of(model) == 0
    with torch.no_grad():
        tokens_or_map = model.forward_features(images)
        expected = tokens_or_map[:, 0] if tokens_or_map.ndim == 3 else tokens_or_map.mean((2, 3))
        torch.testing.assert_close(model(images), expected)
        torch.testing.assert_close(model(images), plain(images))
    assert model.num_features == plain.num_features
    assert use_standard_pooling(plain) is plain  # a model without grid pooling: unchanged
