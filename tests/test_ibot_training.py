"""iBOT in training: block masks as DINOv2 draws them, a masked patch's pixels hidden from the
student, and DINO + iBOT (+ KoLeo) training end to end with the loss made of its terms."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO, DINOLoss, iBOTPatchLoss
from lightning_dino.networks.masking import batch_masks, block_mask
from tests.conftest import TINY_VIT, CropData, make_trainer
from tests.networks.test_networks_tokens import reference_tokens


def test_block_masks_cover_about_the_target_in_blocks():
    torch.manual_seed(0)
    for target in (10, 40, 90):
        counts = [int(block_mask(14, 14, target, max_block=98).sum()) for _ in range(20)]
        assert max(counts) <= target and sum(counts) / len(counts) >= 0.8 * target, (target, counts)
    mask = block_mask(14, 14, 30)
    # Blocks of >= 4 patches: every masked patch has a masked neighbour.
    padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert bool((neighbours[mask] > 0).all())
    assert int(block_mask(14, 14, 0).sum()) == 0


def test_batch_masks_mask_half_the_images_with_ratios_spread_over_the_range():
    torch.manual_seed(0)
    masks = batch_masks(64, 16, 16, ratio=(0.1, 0.5), probability=0.5)
    assert masks.shape == (64, 256)
    ratios = masks.float().mean(dim=1)
    masked = ratios[ratios > 0]
    assert len(masked) == 32  # int(64 * 0.5) images, every one with some patches masked
    assert masked.max() <= 0.5 and masked.min() >= 0.05
    assert 0.22 <= masked.mean() <= 0.32  # ratios spread over [0.1, 0.5] (mean 0.3, a little short)


def test_a_masked_patch_is_hidden_from_the_student_and_the_rest_is_not():
    model = DINO(**TINY_VIT, ibot_loss_weight=1.0, drop_path_rate=0.0).eval()
    vit, token = model.student.backbone, torch.randn(1, 32)
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True  # patch (1, 1): pixels 8..15 x 8..15
    changed = images.clone()
    changed[..., 8:16, 8:16] += 1.0
    with torch.no_grad():
        assert torch.equal(reference_tokens(vit, images, masks, token), reference_tokens(vit, changed, masks, token))
        assert not torch.equal(reference_tokens(vit, images), reference_tokens(vit, changed))
        torch.testing.assert_close(reference_tokens(vit, images), vit.forward_features(images))


def test_dino_plus_ibot_plus_koleo_trains_and_the_loss_is_its_weighted_terms():
    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, ibot_loss_weight=0.5, koleo_loss_weight=0.1)
    assert "mask_token" in dict(model.student.named_parameters())
    start = copy.deepcopy(model)
    rows = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            rows.append({k: metrics[k].item() for k in ("train/dino_loss", "train/ibot_loss", "train/koleo_loss")}
                        | {"loss": outputs["loss"].item()})

    trainer = make_trainer(max_steps=3, callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(model, CropData(batch_size=8, n=24))
    for row in rows:
        assert row["loss"] == pytest.approx(row["train/dino_loss"] + 0.5 * row["train/ibot_loss"]
                                            + 0.1 * row["train/koleo_loss"], rel=1e-5)
        assert row["train/ibot_loss"] > 0
    assert torch.count_nonzero(model.ibot.loss.center) > 0  # the patch centre moved
    assert not torch.equal(model.student.mask_token, start.student.mask_token)  # learned
    # The mask token is averaged into the teacher like every other parameter.
    assert not torch.equal(model.teacher.mask_token, start.teacher.mask_token)


def test_ibot_needs_token_wide_vit_features():
    with pytest.raises(ValueError, match=r"DINO\(ibot_loss_weight=...\) needs a ViT"):
        DINO(**TINY_VIT, ibot_loss_weight=1.0, feature_grid=2)
    with pytest.raises(ValueError, match=r"DINO\(ibot_mask_ratio=\(0.5, 0.1\)\) is invalid"):
        DINO(**TINY_VIT, ibot_loss_weight=1.0, ibot_mask_ratio=(0.5, 0.1))


def test_ibot_loss_of_one_step_equals_an_independent_computation():
    """The iBOT term of a step from the networks as they were, with the step's own masks."""
    model = DINO(**TINY_VIT, drop_path_rate=0.0, warmup_epochs=0, ibot_loss_weight=1.0)
    start = copy.deepcopy(model)
    captured = {}
    term = model.ibot
    draw, forward = term.draw_masks, term.forward

    def masks_spy(*args):
        captured["masks"] = draw(*args)
        return captured["masks"]

    def forward_spy(outputs, temp):
        loss = forward(outputs, temp)
        captured.update(crops=outputs.crops, temp=temp, ibot=loss.detach())
        return loss

    term.draw_masks, term.forward = masks_spy, forward_spy
    make_trainer(max_steps=1).fit(model, CropData(batch_size=8, n=8))
    crops, masks, temp = captured["crops"], captured["masks"], captured["temp"]
    # Independently: tokens of each network, heads on the masked patches, per-image loop.
    images = torch.cat(crops[:2])
    with torch.no_grad():
        student_tokens = reference_tokens(start.student.backbone, images, masks, start.student.mask_token)
        teacher_tokens = reference_tokens(start.teacher.backbone, images)
        s = start.student.head(student_tokens[:, 1:][masks])
        t = torch.softmax(start.teacher.head(teacher_tokens[:, 1:][masks]) / temp, dim=-1)  # centre 0
    total, row = 0.0, 0
    for image_mask in masks:
        n = int(image_mask.sum())
        per = [float((t[row + i].double() * torch.log_softmax(s[row + i].double() / 0.1, -1)).sum()) for i in range(n)]
        total += sum(per) / max(n, 1)
        row += n
    assert captured["ibot"].item() == pytest.approx(-total / len(masks), rel=1e-5)
    assert isinstance(model.ibot.loss, iBOTPatchLoss) and isinstance(model.loss, DINOLoss)
