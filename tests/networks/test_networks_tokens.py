"""The one token forward serves every timm ViT family the package accepts (VisionTransformer with
and without registers, Eva with rotary positions as timm builds DINOv3): with nothing masked it is
timm's own forward_features, a masked patch reaches the network only as the mask token, and it
goes through the backbone's own call (so a sharded backbone's hooks fire)."""

import pytest
import timm
import torch
from torch import nn

from lightning_dino.networks.tokens import check_token_backbone, token_forward, token_problem

TINY = {"pretrained": False, "num_classes": 0, "depth": 2, "embed_dim": 32, "num_heads": 2,
        "dynamic_img_size": True}
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "vit_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "patch_size": 7}),
    "eva_rope_dinov3": ("vit_small_patch16_dinov3", {"img_size": 32, "patch_size": 8, "global_pool": "token"}),
}


def build(family):
    name, kwargs = FAMILIES[family]
    return timm.create_model(name, **TINY, **kwargs).eval()


def reference_tokens(vit, images, masks=None, mask_token=None):
    """An independent transcription of timm's forward_features for both families, with masked
    patch embeddings replaced by the mask token before any position information (iBOT, DINOv2/3)."""
    x = vit.patch_embed(images)
    if masks is not None:
        shape = x.shape[:-1]
        x = torch.where(masks.reshape(shape).unsqueeze(-1), mask_token.reshape(-1).to(x.dtype), x)
    if hasattr(vit, "rope"):  # Eva: rotary positions go to every block
        x, rope = vit._pos_embed(x)
        x = vit.norm_pre(x)
        for block in vit.blocks:
            x = block(x, rope=rope)
    else:
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        x = vit.blocks(x)
    return vit.norm(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_unmasked_tokens_are_timms_forward_features_and_pooled_its_output(family):
    vit = build(family)
    images = torch.randn(2, 3, 32, 24) if family != "vit_registers" else torch.randn(2, 3, 28, 21)
    with torch.no_grad():
        pooled, tokens = token_forward(vit, images)
        torch.testing.assert_close(tokens, vit.forward_features(images), rtol=0, atol=0)
        torch.testing.assert_close(pooled, vit(images), rtol=0, atol=0)
        torch.testing.assert_close(tokens, reference_tokens(vit, images))
    assert tokens.shape[1] == vit.num_prefix_tokens + (4 * 3)
    assert not vit.patch_embed._forward_hooks and not vit.norm._forward_hooks  # nothing left behind


@pytest.mark.parametrize("family", FAMILIES)
def test_a_masked_patch_reaches_the_network_only_as_the_mask_token(family):
    vit = build(family)
    patch = vit.patch_embed.patch_size[0]
    images = torch.randn(2, 3, 4 * patch, 4 * patch)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 5] = masks[1, [0, 15]] = True
    token = torch.randn(1, 32)
    changed = images.clone()
    changed[0, :, patch:2 * patch, patch:2 * patch] += 1.0  # patch 5 of image 0
    with torch.no_grad():
        _, masked = token_forward(vit, images, masks, token)
        _, masked_changed = token_forward(vit, changed, masks, token)
        _, unmasked_changed = token_forward(vit, changed)
        torch.testing.assert_close(masked, reference_tokens(vit, images, masks, token))
    assert torch.equal(masked, masked_changed)
    assert not torch.equal(unmasked_changed, token_forward(vit, images)[1])


def test_the_forward_is_one_call_of_the_backbone():
    vit = build("eva_rope_dinov3")
    calls = []
    vit.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    token_forward(vit, torch.randn(1, 3, 32, 32))
    assert calls == ["Eva"]


def test_a_backbone_without_tokens_is_named_with_the_option_that_needs_them():
    resnet = timm.create_model("test_resnet", num_classes=0)
    assert "ResNet is not a timm ViT" in token_problem(resnet)
    assert token_problem(build("eva_rope_dinov3")) is None
    with pytest.raises(ValueError, match=r"DINO\(gram_loss_weight=\.\.\.\) needs patch tokens: ResNet is not a timm ViT"
                                         r".*vit_small_patch16_dinov3.*DINO\(gram_loss_weight=0\)"):
        check_token_backbone(resnet, "model", "gram_loss_weight")
    with pytest.raises(ValueError, match="mask_token"):
        token_forward(build("vit"), torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))
    assert token_problem(nn.Linear(2, 2)).startswith("Linear is not")
