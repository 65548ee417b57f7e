"""The fast path (grouped multi-crop forward, cheap per-step diagnostics) computes what the
per-view path computes.

Grouping concatenates the crops of one size into one backbone call. For a network whose
output for a sample does not depend on the other samples of the batch (a ViT, or any network
in eval mode) that is exactly the per-crop result. BatchNorm in train mode normalises with
statistics of the whole call, so grouped and per-crop *legitimately* differ for a ResNet in
train mode (the reference groups too); ResNets are therefore compared in eval mode, where
BatchNorm uses its running statistics.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.eval.diagnostics import collapse_statistics, teacher_entropy_ratio
from lightning_dino.losses.dino import DINOLoss
from tests.conftest import TINY_VIT, CropData, make_trainer

TINY_RESNET = {"backbone": "test_resnet", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def _loss_and_grads(model: DINO, crops: list[torch.Tensor], grouped: bool):
    student, teacher = model.student, model.teacher
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        if grouped:
            teacher_out = teacher(crops[:2])
        else:
            teacher_out = torch.stack([teacher.head(teacher.backbone(c)) for c in crops[:2]])
    if grouped:
        student_out = student(crops)
    else:
        student_out = torch.stack([student.head(student.backbone(c)) for c in crops])
    loss = DINOLoss(model.hparams.out_dim)(student_out, teacher_out, teacher_temp=0.04)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("kwargs", "train_mode"),
    [(TINY_VIT, True), (TINY_RESNET, False)],
    ids=["vit-train-mode", "resnet-eval-mode"],
)
def test_grouped_forward_has_the_per_crop_loss_and_gradients(kwargs, train_mode):
    torch.manual_seed(0)
    model = DINO(**kwargs, drop_path_rate=0.0).train(train_mode)
    crops, _ = next(iter(CropData(n_local=3).train_dataloader()))
    grouped_loss, grouped_grads = _loss_and_grads(model, crops, grouped=True)
    per_crop_loss, per_crop_grads = _loss_and_grads(model, crops, grouped=False)
    torch.testing.assert_close(grouped_loss, per_crop_loss, rtol=1e-5, atol=1e-6)
    assert grouped_grads.keys() == per_crop_grads.keys() and len(grouped_grads) > 10
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, per_crop_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_entropy_ratio_matches_collapse_statistics():
    torch.manual_seed(0)
    student, teacher, center = torch.randn(4, 8, 32), torch.randn(2, 8, 32), torch.randn(1, 32)
    full = collapse_statistics(student, teacher, center, 0.1, 0.05)
    torch.testing.assert_close(
        teacher_entropy_ratio(teacher, center, 0.05), full["teacher_entropy_ratio"]
    )


class _Outputs(Callback):
    def __init__(self) -> None:
        self.diagnostics: list[set[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.diagnostics.append(set(outputs["diagnostics"]))


def test_full_diagnostics_only_on_logging_steps_entropy_ratio_every_step():
    model = DINO(**TINY_VIT, warmup_epochs=0, freeze_last_layer=0)
    outputs = _Outputs()
    trainer = make_trainer(max_steps=4, log_every_n_steps=2, callbacks=[outputs])
    trainer.fit(model, datamodule=CropData(n=16, batch_size=4))
    assert all("teacher_entropy_ratio" in keys for keys in outputs.diagnostics)
    full = [len(keys) > 1 for keys in outputs.diagnostics]
    assert full == [False, True, False, True]
    assert "diagnostics/teacher_student_kl" in trainer.callback_metrics


def test_compile_option_compiles_backbones_in_place_keeping_checkpoint_keys():
    plain = DINO(**TINY_VIT)
    compiled = DINO(**TINY_VIT, compile=True)
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    for network in (compiled.student, compiled.teacher):
        assert network.backbone._compiled_call_impl is not None
        assert network.head._compiled_call_impl is None


def test_channels_last_resnet_computes_the_same_loss_and_gradients():
    crops, _ = next(iter(CropData(n_local=2).train_dataloader()))
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = DINO(**TINY_RESNET, drop_path_rate=0.0, channels_last=channels_last).train()
        conv = model.student.backbone.conv1[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        results[channels_last] = _loss_and_grads(model, crops, grouped=True)
    (loss, grads), (cl_loss, cl_grads) = results[False], results[True]
    torch.testing.assert_close(cl_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(cl_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_vits_keep_their_layout_and_use_fused_scaled_dot_product_attention():
    model = DINO(**TINY_VIT)
    backbone = model.student.backbone
    assert backbone.patch_embed.proj.weight.is_contiguous()
    assert all(block.attn.fused_attn for block in backbone.blocks)
    with torch.profiler.profile() as profiler:
        backbone(torch.randn(2, 3, 32, 32))
    assert any("scaled_dot_product" in event.key for event in profiler.key_averages())
