import matplotlib.image
import pytest
import timm
import torch
from torch import nn

from lightning_dino.eval import (
    attention_grid,
    attention_maps,
    attention_mass_mask,
    save_attention_png,
)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        dynamic_img_size=True,
        **kwargs,
    )


class Capture(nn.Module):
    """Stands in for `attn_drop`, which the non-fused path applies to the softmax output."""

    def forward(self, attn):
        self.attn = attn
        return attn


def reference_maps(vit, images):
    """The model's own non-fused attention probabilities: CLS row, patch keys, renormalised."""
    attn = vit.blocks[-1].attn
    attn.fused_attn, attn.attn_drop = False, Capture()
    vit.eval()
    with torch.no_grad():
        vit(images)
    row = attn.attn_drop.attn[:, :, 0, vit.num_prefix_tokens :]
    row = row / row.sum(-1, keepdim=True)
    return row.reshape(*row.shape[:2], images.shape[-2] // 8, images.shape[-1] // 8)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_maps_shape_mass_and_reference(size, reg_tokens):
    vit = tiny_vit(reg_tokens=reg_tokens)
    images = torch.randn(2, 3, *size)
    maps = attention_maps(vit, images)
    assert maps.shape == (2, 3, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 3))
    torch.testing.assert_close(maps, reference_maps(vit, images), rtol=1e-5, atol=1e-6)


def test_backbone_untouched():
    vit = tiny_vit().train()
    images = torch.randn(2, 3, 32, 32)
    vit.eval()
    before = vit(images)
    vit.train()
    attention_maps(vit, images, threshold=0.6)
    attn = vit.blocks[-1].attn
    assert vit.training
    assert attn.fused_attn
    assert not attn._forward_hooks and not attn._forward_pre_hooks
    vit.eval()
    torch.testing.assert_close(vit(images), before, rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
def test_threshold_keeps_minimal_mass(threshold):
    vit = tiny_vit()
    images = torch.randn(3, 3, 48, 48)
    maps = attention_maps(vit, images)
    mask = attention_maps(vit, images, threshold=threshold)
    assert mask.shape == maps.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = (maps * mask).sum(dim=(-2, -1))
    smallest_kept = torch.where(mask.bool(), maps, torch.inf).amin(dim=(-2, -1))
    assert (kept >= threshold - 1e-6).all()
    assert (kept - smallest_kept < threshold).all()


def test_mass_mask_on_known_map():
    maps = torch.tensor([[[0.5, 0.1], [0.3, 0.1]]])
    assert attention_mass_mask(maps, 0.5).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert attention_mass_mask(maps, 0.6).tolist() == [[[1.0, 0.0], [1.0, 0.0]]]
    with pytest.raises(ValueError, match="threshold"):
        attention_mass_mask(maps, 0.0)


def test_non_vit_gets_clear_error():
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with pytest.raises(TypeError, match=r"not a ViT: .*timm VisionTransformer or Eva \(got ResNet\)"):
        attention_maps(resnet, torch.randn(1, 3, 32, 32))


def test_png_and_grid(tmp_path):
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 40)
    maps = attention_maps(vit, images)
    path = save_attention_png(images[0], maps[0], tmp_path / "sub" / "attn.png")
    assert matplotlib.image.imread(path).ndim == 3
    grid = attention_grid(images, maps)
    assert grid.shape == (3, 2 * (32 + 2) + 2, 5 * (40 + 2) + 2)
    assert 0.0 <= grid.min() and grid.max() <= 1.0
