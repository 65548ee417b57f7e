import itertools
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.training.optimization import clip_gradients_per_tensor, parameter_groups
from tests.conftest import TINY_VIT, CropData, make_trainer


def test_parameter_groups_no_decay_on_biases_and_1d():
    model = DINO(**TINY_VIT)
    decay, no_decay = parameter_groups(model.student)
    names = {id(p): n for n, p in model.student.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    # Exactly the reference's split: biases and 1-D parameters undecayed, every other trainable one
    # decayed (a split that decayed biases, or kept norm weights out of both groups, fails here).
    trainable = {n: p for n, p in model.student.named_parameters() if p.requires_grad}
    assert no_decay_names == {n for n, p in trainable.items() if n.endswith(".bias") or p.ndim == 1}
    assert decay_names == set(trainable) - no_decay_names
    assert "backbone.blocks.0.attn.qkv.bias" in no_decay_names and "head.mlp.0.bias" in no_decay_names
    assert "backbone.cls_token" in decay_names and "backbone.pos_embed" in decay_names
    assert "backbone.blocks.0.norm1.weight" in no_decay_names
    assert "head.last_layer.parametrizations.weight.original1" in decay_names
    # The frozen weight-norm magnitude is not trained at all.
    assert "head.last_layer.parametrizations.weight.original0" not in decay_names | no_decay_names


def test_per_tensor_clipping():
    params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(3)]
    grads = [torch.full((5,), 10.0), torch.full((5,), 0.1), torch.tensor([3.0, 4.0, 0, 0, 0])]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clip_gradients_per_tensor(params, 3.0)
    norms = [p.grad.norm().item() for p in params]
    assert norms[0] == pytest.approx(3.0, rel=1e-5)  # clipped alone, not by a global factor
    assert norms[1] == pytest.approx(0.1 * 5**0.5, rel=1e-6)  # small ones untouched
    assert norms[2] == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(params[2].grad[:2], torch.tensor([1.8, 2.4]), rtol=1e-5, atol=1e-6)


class GradNormRecorder(Callback):
    """Each step's gradients before the module clips them and after (as the optimizer used them).

    Trainer callbacks' ``on_before_optimizer_step`` runs before the module's, which clips; the
    gradients are left in place by the optimizer step until the next step zeroes them.
    """

    def __init__(self):
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.student.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.student.parameters()])

    def norms(self):
        """Per step, (norm before, norm after) of every tensor that had a gradient after the clip."""
        return [[(b.norm().item(), a.norm().item()) for b, a in zip(before, after, strict=True) if a is not None]
                for before, after in zip(self.before, self.after, strict=True)]


class ScheduleRecorder(GradNormRecorder):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Callbacks run before the module's hook; record what the optimizer will use.
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        groups = optimizer.param_groups
        self.rows.append((trainer.global_step, groups[0]["lr"], groups[0]["weight_decay"], groups[1]["weight_decay"]))


def test_schedules_in_a_run_and_lr_scaling():
    model = DINO(**TINY_VIT, lr=0.0005, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                 clip_grad=1e-3)
    recorder = ScheduleRecorder()
    trainer = make_trainer(max_epochs=3, callbacks=[recorder])
    trainer.fit(model, CropData(batch_size=4, n=16))  # 4 steps per epoch, 12 in all
    assert model.peak_lr == pytest.approx(0.0005 * 4 / 256)
    steps, lrs, wds, no_decay_wds = zip(*recorder.rows, strict=True)
    assert steps == tuple(range(12))
    assert lrs[0] == 0.0  # warmup starts at 0
    assert lrs[3] == pytest.approx(model.peak_lr)  # end of the 4-step warmup
    assert lrs[-1] < lrs[4] and lrs[-1] >= 1e-6
    assert wds[0] == pytest.approx(0.04) and wds[-1] == pytest.approx(0.4, rel=0.02)
    assert set(no_decay_wds) == {0.0}
    # What the optimizer held: biases and 1-D parameters in the undecayed group, the rest decayed.
    names = {id(p): n for n, p in model.student.named_parameters()}
    decayed, undecayed = ({names[id(p)] for p in group["params"]} for group in trainer.optimizers[0].param_groups)
    assert undecayed == {n for n, p in model.student.named_parameters() if p.requires_grad and
                         (n.endswith(".bias") or p.ndim == 1)}
    assert decayed == {n for n, p in model.student.named_parameters() if p.requires_grad} - undecayed
    # Every gradient tensor (norms 0.04 to 1.5e3 here) is above the 1e-3 clip, so the per-tensor
    # clip leaves each of them at exactly 1e-3 (to the clip's 1e-6 in clip / (norm + 1e-6), a
    # relative 3e-5 at the smallest norm). A global-norm clip would scale all by one factor: the
    # largest tensor near 1e-3, every other one far below it.
    for step, norms in enumerate(recorder.norms()):
        assert len(norms) > 30, step
        for before, after in norms:
            assert before > 1e-3 and after == pytest.approx(1e-3, rel=1e-4), (step, before, after)


def test_per_tensor_clipping_in_a_run():
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=0, clip_grad=3.0)
    recorder = GradNormRecorder()
    make_trainer(max_steps=2, callbacks=[recorder]).fit(model, CropData(batch_size=4, n=8))
    assert len(recorder.before) == len(recorder.after) == 2
    for step, (before, after) in enumerate(zip(recorder.before, recorder.after, strict=True)):
        clipped = unclipped = 0
        for b, a in zip(before, after, strict=True):
            if b is None:
                assert a is None
                continue
            norm = b.norm().item()
            # DINO's clip: each tensor on its own, factor min(1, 3 / (norm + 1e-6)).
            factor = min(1.0, 3.0 / (norm + 1e-6))
            torch.testing.assert_close(a, b * factor, rtol=1e-5, atol=1e-8)
            clipped += factor < 1
            unclipped += factor == 1
        # Gradient norms span 0.04 to 1.5e3: tensors on both sides of the limit in each step, so
        # a global-norm clip (one factor for all, the small ones scaled too) fails above.
        assert clipped > 5 and unclipped > 5, (step, clipped, unclipped)


@pytest.mark.parametrize(("batch", "devices", "accumulate"), [(64, 1, 1), (64, 8, 1), (32, 2, 4)])
def test_global_batch_for_lr_scaling(batch, devices, accumulate):
    model = DINO(**TINY_VIT)
    fake_trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch), world_size=devices,
                                   accumulate_grad_batches=accumulate)
    model._trainer = fake_trainer  # the lr scaling reads only these trainer attributes
    assert model.global_batch_size() == batch * devices * accumulate


def test_last_layer_frozen_in_first_epoch_no_weight_decay_either():
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=1, weight_decay=0.5, weight_decay_end=0.5)
    last = model.student.head.last_layer.parametrizations.weight.original1
    before = last.detach().clone()
    other = model.student.head.mlp[0].weight.detach().clone()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, CropData(batch_size=4, n=8))
    assert torch.equal(last.detach(), before)
    assert not torch.equal(model.student.head.mlp[0].weight.detach(), other)
    state = trainer.optimizers[0].state
    assert last not in state or len(state[last]) == 0  # AdamW never touched it


def test_last_layer_trains_after_freeze_period():
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=1)
    last = model.student.head.last_layer.parametrizations.weight.original1
    before = last.detach().clone()
    make_trainer(max_epochs=2).fit(model, CropData(batch_size=4, n=8))
    assert not torch.equal(last.detach(), before)


def test_grouped_forward_equals_per_crop_forward():
    model = DINO(**TINY_VIT, drop_path_rate=0.0).eval()
    crops, _ = next(iter(CropData(n_local=3).train_dataloader()))
    grouped = model.student(crops)
    per_crop = torch.stack([model.student.head(model.student.backbone(c)) for c in crops])
    torch.testing.assert_close(grouped, per_crop, rtol=1e-4, atol=1e-5)


def test_centre_updates_once_per_optimizer_step_under_accumulation():
    model = DINO(**TINY_VIT, warmup_epochs=0)
    centres = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            centres.append(pl_module.loss.center.clone())

    make_trainer(accumulate_grad_batches=2, callbacks=[Spy()]).fit(model, CropData(batch_size=4, n=16))
    changed = [not torch.equal(a, b) for a, b in itertools.pairwise(centres)]
    assert torch.count_nonzero(centres[0]) == 0  # after micro-batch 0 no optimizer step yet
    assert changed == [True, False, True]


@pytest.mark.parametrize(("key", "value"), [("out_dim", 1), ("center_momentum", 1.5), ("teacher_temp", 0.0),
                                              ("clip_grad", -1.0), ("n_global_crops", 3)])
def test_invalid_config_fails_fast_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"DINO\({key}={value!r}\) is invalid"):
        DINO(**{**TINY_VIT, key: value})


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        DINO(backbone="vit_smal_patch16_224")


def test_resnet_backbone_and_nn_module_backbone():
    model = DINO(backbone="test_resnet", out_dim=32, hidden_dim=16, bottleneck_dim=8)
    crops, _ = next(iter(CropData().train_dataloader()))
    assert model.student(crops).shape == (4, 4, 32)
    custom = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = DINO(backbone=custom, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    assert model.teacher.backbone is not custom and model.student.backbone is custom
    assert model.student(crops).shape == (4, 4, 32)
    assert "backbone" not in model.hparams
