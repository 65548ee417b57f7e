"""KoLeo, Sinkhorn-Knopp and the iBOT patch loss (DINOv2), each against an independent float64
computation, in fp32 under autocast, and Sinkhorn-Knopp over two gloo ranks."""

import math

import numpy as np
import pytest
import torch

from lightning_dino import KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp
from tests.conftest import run_on_gloo


def koleo_brute_force(x):
    """-mean log(distance to the nearest other row) of the L2-normalised rows, by loops in float64."""
    rows = [r / max(np.linalg.norm(r), 1e-8) for r in x.double().numpy()]
    total = 0.0
    for i, row in enumerate(rows):
        nearest = min((np.linalg.norm(row - other), j) for j, other in enumerate(rows) if j != i)[0]
        total += math.log(nearest + 1e-8)
    return -total / len(rows)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_koleo_equals_brute_force_nearest_neighbours(dtype):
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    x[5] = x[3] * 2.0 + 1e-3  # a near duplicate (same direction): a tiny distance dominates
    want = koleo_brute_force(x)
    if dtype is None:
        got = KoLeoLoss()(x)
    else:
        with torch.autocast("cpu", dtype=dtype):
            got = KoLeoLoss()(x)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)  # fp32 distances of unit vectors
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))


def sinkhorn_float64(logits, temp, iterations=3):
    """DINOv2's sinkhorn_knopp_teacher, transcribed in float64 for one process."""
    q = np.exp(logits.double().numpy() / temp).T
    n, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    q *= n
    return torch.from_numpy(q.T)


def test_sinkhorn_knopp_equals_the_dinov2_algorithm_and_balances_prototypes():
    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)) * 2
    logits[:, 0] += 3.0  # one prototype favoured by every sample
    got = sinkhorn_knopp(logits, teacher_temp=0.5)
    torch.testing.assert_close(got.double(), sinkhorn_float64(logits, 0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(32))  # an assignment per sample
    softmax = torch.softmax(logits / 0.5, dim=1)
    usage, softmax_usage = got.mean(dim=0), softmax.mean(dim=0)
    assert (usage - 0.1).abs().max() < 0.25 * (softmax_usage - 0.1).abs().max()  # far more even
    # Logits / temperature up to ~300: DINOv2's fp32 exp overflows to inf above 88 (NaN targets).
    assert (logits * 1.5).max() / 0.04 > 88
    large = sinkhorn_knopp(logits * 1.5, teacher_temp=0.04)
    assert torch.isfinite(large).all()
    torch.testing.assert_close(large.sum(dim=1), torch.ones(32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sinkhorn_knopp(logits, 0.5).dtype == torch.float32


def _sinkhorn_half(rank):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    return sinkhorn_knopp(logits[rank * 8:(rank + 1) * 8], teacher_temp=0.3)


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_sinkhorn_knopp_over_two_ranks_equals_one_process_on_all_rows(tmp_path):
    results = run_on_gloo(_sinkhorn_half, tmp_path)
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    whole = sinkhorn_knopp(logits, teacher_temp=0.3)
    torch.testing.assert_close(torch.cat(results), whole, rtol=1e-5, atol=1e-7)


def _sinkhorn_uneven(rank):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    return sinkhorn_knopp(logits[:11] if rank == 0 else logits[11:], teacher_temp=0.3)


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_sinkhorn_knopp_over_ranks_with_different_row_counts(tmp_path):
    """iBOT's masked patches differ in number per rank: 11 rows on one, 5 on the other."""
    results = run_on_gloo(_sinkhorn_uneven, tmp_path)
    assert [len(r) for r in results] == [11, 5]
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.cat(results).double(), sinkhorn_float64(logits, 0.3), rtol=1e-5, atol=1e-7)


def ibot_per_image_loop(student, teacher, masks, temp=0.1):
    """-(1/B) sum_b mean over b's masked patches of sum_k t log softmax(s / temp), in float64."""
    total, row = 0.0, 0
    for image_mask in masks:
        count = int(image_mask.sum())
        image_total = 0.0
        for _ in range(count):
            log_p = torch.log_softmax(student[row].double() / temp, dim=-1)
            image_total += float((teacher[row].double() * log_p).sum())
            row += 1
        total += image_total / max(count, 1)
    return -total / masks.shape[0]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_ibot_patch_loss_equals_a_per_image_loop(dtype):
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 16, generator=gen) < 0.4
    masks[2] = False  # an unmasked image counts in the batch size, contributes nothing
    m = int(masks.sum())
    student = torch.randn(m, 12, generator=gen)
    teacher = torch.softmax(torch.randn(m, 12, generator=gen) / 0.07, dim=-1)
    loss_fn = iBOTPatchLoss(12)
    if dtype is None:
        got = loss_fn(student, teacher, masks)
    else:
        with torch.autocast("cpu", dtype=dtype):
            got = loss_fn(student, teacher, masks)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ibot_per_image_loop(student, teacher, masks), rel=1e-6)
    with pytest.raises(ValueError, match=r"masks\.sum"):
        loss_fn(student[1:], teacher[1:], masks)


def test_ibot_teacher_targets_and_centre():
    loss_fn = iBOTPatchLoss(8, center_momentum=0.9)
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_fn.teacher_probs(logits, 0.07), torch.softmax(logits / 0.07, dim=-1))
    loss_fn.accumulate_center(logits)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * logits.mean(dim=0, keepdim=True))
    centred = torch.softmax((logits - loss_fn.center) / 0.07, dim=-1)
    torch.testing.assert_close(loss_fn.teacher_probs(logits, 0.07), centred)


def test_dino_loss_with_sinkhorn_knopp_targets():
    from lightning_dino import DINOLoss

    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(4, 6, 10, generator=gen), torch.randn(2, 6, 10, generator=gen)
    loss_fn = DINOLoss(10, centering="sinkhorn_knopp")
    got = loss_fn(student, teacher, 0.07)
    targets = sinkhorn_float64(teacher.reshape(12, 10), 0.07).reshape(2, 6, 10)
    log_p = torch.log_softmax(student.double() / 0.1, dim=-1)
    pairs = [(t, v) for t in range(2) for v in range(4) if v != t]
    want = sum(-(targets[t] * log_p[v]).sum(-1).mean() for t, v in pairs) / len(pairs)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.count_nonzero(loss_fn.center) == 0  # Sinkhorn-Knopp replaces the centre


def test_training_with_koleo_and_sinkhorn_knopp_adds_the_weighted_term():
    import copy

    from lightning.pytorch.callbacks import Callback

    from lightning_dino import DINO, DINOLoss
    from tests.conftest import TINY_VIT, CropData, make_trainer

    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, koleo_loss_weight=0.1,
                 centering="sinkhorn_knopp")
    before = copy.deepcopy(model)
    seen = {}

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("loss", outputs["loss"].detach().clone())
            seen.setdefault("crops", batch[0])
            seen.setdefault("koleo", trainer.callback_metrics["train/koleo_loss"].clone())

    make_trainer(max_steps=1, callbacks=[Record()]).fit(model, CropData(batch_size=8, n=8))
    crops = seen["crops"]
    with torch.no_grad():
        teacher_out = before.teacher(crops[:2])
        student_out, features = before.student.forward_with_features(crops)
    dino = DINOLoss(TINY_VIT["out_dim"], centering="sinkhorn_knopp")(student_out, teacher_out, 0.04)
    koleo = koleo_brute_force(features[0]) + koleo_brute_force(features[1])
    assert seen["koleo"].item() == pytest.approx(koleo, rel=1e-5)
    assert seen["loss"].item() == pytest.approx(dino.item() + 0.1 * koleo, rel=1e-5)
    assert torch.count_nonzero(model.loss.center) == 0


def dinov2_lr_decay_rate(name, lr_decay_rate, num_layers):
    """DINOv2's get_vit_lr_decay_rate for a backbone parameter (force_is_backbone), transcribed."""
    layer_id = num_layers + 1
    if any(key in name for key in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".reg_token")):
        layer_id = 0
    elif ".blocks." in name and ".residual." not in name:
        layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def test_layerwise_lr_decay_scales_each_parameter_like_dinov2():
    from lightning.pytorch.callbacks import Callback

    from lightning_dino import DINO
    from tests.conftest import TINY_VIT, CropData, make_trainer

    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=0, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    used = {}

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    used[id(param)] = (group["lr"], group["weight_decay"])

    make_trainer(max_steps=1, callbacks=[Record()]).fit(model, CropData(n=4))
    base = model.learning_rate(0)
    for name, param in model.student.named_parameters():
        if not param.requires_grad:
            continue
        scale = dinov2_lr_decay_rate("." + name, 0.9, 2) if name.startswith("backbone.") else 1.0
        scale *= 0.2 if "patch_embed" in name else 1.0
        lr, wd = used[id(param)]
        assert lr == pytest.approx(base * scale, rel=1e-12), name
        assert (wd == 0.0) == (name.endswith(".bias") or param.ndim == 1), name
    assert {round(lr / base, 6) for lr, _ in used.values()} == {1.0, 0.9, 0.81, 0.729, round(0.729 * 0.2, 6)}


def test_a_vit_with_registers_trains_exports_and_shows_patch_attention_only(tmp_path):
    from lightning_dino import DINO, attention_maps, export_backbone, load_backbone
    from tests.conftest import TINY_VIT, CropData, make_trainer

    vit = {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "reg_tokens": 4}}
    model = DINO(**vit, warmup_epochs=0)
    assert model.teacher.backbone.num_prefix_tokens == 5  # class token + 4 registers
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData())
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model.teacher.backbone, images)
    assert maps.shape == (2, 2, 4, 4)  # heads x the 4 x 4 patch grid: registers left out
    torch.testing.assert_close(maps.sum(dim=(2, 3)) <= 1.0 + 1e-6, torch.ones(2, 2, dtype=torch.bool))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    reloaded = load_backbone(export_backbone(tmp_path / "run.ckpt", tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model.teacher.backbone.eval()(images), rtol=0, atol=1e-6)
