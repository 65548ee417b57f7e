"""DINOv3's switches, each against an independent computation of the official formula
(facebookresearch/dinov3 at 6876159; the file of each is named in its test) and each off by
default: the head without weight norm, the exact mask count, AdamW's betas, the square-root
learning-rate rule, clipping per submodule, the local-crop weight, KoLeo over groups of ranks and
the rescaled rotary coordinates (tests/networks/test_networks_rope.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dino import DINO, DINOLoss
from lightning_dino.losses.koleo import koleo_over_ranks
from lightning_dino.networks.head import DINOHead
from lightning_dino.networks.masking import batch_masks
from lightning_dino.training.optimization import (
    clip_gradients_per_module,
    lr_scale,
    student_submodules,
)
from tests.conftest import TINY_VIT, CropData, make_trainer, run_on_gloo
from tests.losses.test_losses_dinov2 import koleo_brute_force


def test_every_switch_is_off_by_default():
    model = DINO(**TINY_VIT)
    hp = model.hparams
    assert (hp.head_weight_norm, hp.ibot_mask_rule, hp.koleo_group_size, hp.clip_mode, tuple(hp.adamw_betas),
            hp.lr_scaling, hp.local_loss_weight, hp.rope_rescale_coords) == (
        True, "dinov2", 0, "per_tensor", (0.9, 0.999), "linear_wrt_256", 1.0, 0.0)
    assert hasattr(model.student.head.last_layer, "parametrizations")


def test_the_head_without_weight_norm_is_a_plain_linear_as_dinov3():
    """dinov3/layers/dino_head.py: MLP, L2-normalised bottleneck, Linear(bias=False), trunc_normal(0.02)."""
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=4096, hidden_dim=64, bottleneck_dim=16, weight_norm=False)
    assert type(head.last_layer) is nn.Linear and head.last_layer.bias is None
    assert 0.019 < float(head.last_layer.weight.std()) < 0.021  # trunc_normal_(std=0.02), as the MLP
    x = torch.randn(5, 32)
    hidden = head.mlp(x)
    want = (hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-12)) @ head.last_layer.weight.T
    torch.testing.assert_close(head(x), want)
    model = DINO(**TINY_VIT, head_weight_norm=False, ibot_loss_weight=1.0, ibot_separate_head=True)
    for network in (model.student, model.teacher):
        assert type(network.head.last_layer) is nn.Linear and type(network.patch_head.last_layer) is nn.Linear
    assert torch.equal(model.student.head.last_layer.weight, model.teacher.head.last_layer.weight)


def official_mask_counts(n_images, n_patches, ratio, probability):
    """dinov3/data/collate.py: n = int(B * p) images, image i masks int(N * linspace(min, max, n + 1)[i + 1])
    patches (float32), the others none."""
    n = int(n_images * probability)
    edges = np.linspace(ratio[0], ratio[1], n + 1, dtype=np.float32)
    return sorted([int(np.float32(n_patches) * edges[i + 1]) for i in range(n)] + [0] * (n_images - n))


@pytest.mark.parametrize(("n_images", "ratio", "probability"), [(16, (0.1, 0.5), 0.5), (10, (0.2, 0.6), 1.0),
                                                                  (7, (0.1, 0.3), 0.5)])
def test_the_dinov3_rule_masks_exactly_the_official_counts(n_images, ratio, probability):
    torch.manual_seed(0)
    masks = batch_masks(n_images, 16, 16, ratio, probability, rule="dinov3")
    assert sorted(masks.sum(dim=1).tolist()) == official_mask_counts(n_images, 256, ratio, probability)
    torch.manual_seed(0)
    dinov2 = batch_masks(n_images, 16, 16, ratio, probability)
    assert sorted(dinov2.sum(dim=1).tolist()) != official_mask_counts(n_images, 256, ratio, probability)


def test_adamw_betas_the_sqrt_rule_and_per_module_clipping_reach_the_optimizer():
    """dinov3/train/train.py: AdamW(betas=(beta1, beta2)); lr x 4 sqrt(B / 1024); clip_grad_norm_ per submodule."""
    model = DINO(**TINY_VIT, adamw_betas=(0.9, 0.99), lr_scaling="sqrt_wrt_1024", warmup_epochs=0,
                 clip_mode="per_module", monitors=False)
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData(batch_size=4, n=4))
    assert all(group["betas"] == (0.9, 0.99) for group in trainer.optimizers[0].param_groups)
    assert model.peak_lr == pytest.approx(0.0005 * 4 * math.sqrt(4 / 1024))
    assert lr_scale(1024, "sqrt_wrt_1024") == 4.0 and lr_scale(512) == 2.0


def test_per_module_clipping_scales_each_submodule_by_its_global_norm():
    model = DINO(**TINY_VIT, ibot_loss_weight=1.0, ibot_separate_head=True)
    student = model.student
    torch.manual_seed(0)
    for p in student.parameters():
        p.grad = torch.randn_like(p) * 3
    before = {name: p.grad.clone() for name, p in student.named_parameters()}
    clip_gradients_per_module(student_submodules(student), 1.0)
    for prefix in ("backbone.", "head.", "patch_head."):
        names = [n for n in before if n.startswith(prefix) or (prefix == "backbone." and n == "mask_token")]
        norm = math.sqrt(sum(float(before[n].double().pow(2).sum()) for n in names))
        factor = min(1.0, 1.0 / (norm + 1e-6))
        for name in names:
            torch.testing.assert_close(dict(student.named_parameters())[name].grad, before[name] * factor)
    backbone_group = student_submodules(student)[0]
    assert len(backbone_group) == len(list(student.backbone.parameters())) + 1  # with the mask token


def test_the_local_crops_weight_scales_their_pairs_without_renormalising():
    """dinov3/train/ssl_meta_arch.py: 16/18 * w * mean(local pairs) + 2/18 * mean(global pairs)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(10, 3, 8), torch.randn(2, 3, 8)
    loss = DINOLoss(8, local_weight=0.5)
    got = loss(student, teacher, 0.04)
    p = torch.softmax(teacher.double() / 0.04, -1)
    log_q = torch.log_softmax(student.double() / 0.1, -1)
    ce = lambda t, v: float(-(p[t] * log_q[v]).sum(-1).mean())  # noqa: E731
    local = np.mean([ce(t, v) for t in range(2) for v in range(2, 10)])
    cross = np.mean([ce(t, v) for t in range(2) for v in range(2) if v != t])
    assert float(got) == pytest.approx(16 / 18 * 0.5 * local + 2 / 18 * cross, rel=1e-6)


def _koleo_rank(rank):
    torch.manual_seed(0)
    everyone = torch.randn(8, 6, dtype=torch.float64).float().requires_grad_(True)
    mine = everyone[4 * rank: 4 * rank + 4].detach().clone().requires_grad_(True)
    loss = koleo_over_ranks(mine, group_size=8)
    loss.backward()
    return {"loss": loss.detach(), "grad": mine.grad.clone(), "all": everyone.detach()}


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_koleo_over_a_group_of_ranks_seeks_neighbours_in_every_rank_of_the_group(tmp_path):
    """dinov3/loss/koleo_loss.py (distributed): differentiable all-gather, neighbours in the group."""
    ranks = run_on_gloo(_koleo_rank, tmp_path)
    everyone = ranks[0]["all"]
    rows = everyone.double().numpy()
    for rank, result in enumerate(ranks):
        # Brute force: rank r's rows against all 8 rows.
        want = 0.0
        unit = [r / np.linalg.norm(r) for r in rows]
        for i in range(4 * rank, 4 * rank + 4):
            want += math.log(min(np.linalg.norm(unit[i] - unit[j]) for j in range(8) if j != i) + 1e-8)
        assert float(result["loss"]) == pytest.approx(-want / 4, rel=1e-5)
    # The gradient reaching each rank is that of the sum of both ranks' losses (the all-gather
    # backward sums them), as autograd gives on the whole batch in one process.
    x = everyone.clone().requires_grad_(True)
    unit = F.normalize(x, dim=-1, eps=1e-8)
    dots = unit @ unit.T - 3 * torch.eye(8)
    neighbour = dots.argmax(1)
    per_row = -torch.log(torch.linalg.vector_norm(unit - unit[neighbour], dim=-1) + 1e-8)
    (per_row[:4].mean() + per_row[4:].mean()).backward()
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-6)
    assert float(koleo_over_ranks(everyone[:4], 4)) == pytest.approx(koleo_brute_force(everyone[:4]), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of the 4 images per device"):
        koleo_over_ranks(everyone[:4], 6)
