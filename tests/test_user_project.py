"""lightning_dino inside a user's own Lightning project: their backbone, their data, their
Trainer, pretrained weights, and fine-tuning what DINO learned."""

import json

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino import (
    DINO,
    KNNMonitor,
    RandomStateCallback,
    TeacherEMA,
    export_backbone,
    load_backbone,
)
from tests.conftest import TINY_VIT, CropData, RandomCrops, make_trainer


class SmallNet(nn.Module):
    """A user's backbone that only takes 32 x 32 images (a flatten + linear at the end)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 24)

    def forward(self, x):
        if x.shape[-1] == 16:  # local crops: resized to the one size the network takes
            x = nn.functional.interpolate(x, size=(32, 32))
        return self.fc(self.conv(x).relu().flatten(1))


HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


def test_a_custom_backbone_that_cannot_take_224_px_needs_its_width():
    with pytest.raises(ValueError, match=r"pass DINO\(backbone_dim=\.\.\.\)"):
        DINO(backbone=SmallNet(), **HEAD)
    model = DINO(backbone=SmallNet(), backbone_dim=24, **HEAD)
    assert model.student.head.mlp[0].in_features == 24
    crops, _ = next(iter(CropData().train_dataloader()))
    assert model.student(crops).shape == (4, 4, 32)


def test_a_custom_backbone_checkpoint_asks_for_the_backbone(tmp_path):
    model = DINO(backbone=SmallNet(), backbone_dim=24, warmup_epochs=0, **HEAD)
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"backbone=MyBackbone"):
        DINO.load_from_checkpoint(tmp_path / "run.ckpt")
    loaded = DINO.load_from_checkpoint(tmp_path / "run.ckpt", backbone=SmallNet())
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[name], value), name


class DictCrops(pl.LightningDataModule):
    """A user's data module whose batches are dicts."""

    def __init__(self, global_size=32, local_size=16):
        super().__init__()
        self.dataset = RandomCrops(n=8, global_size=global_size, local_size=local_size)

    def train_dataloader(self):
        def collate(samples):
            crops = [torch.stack(views) for views in zip(*(s[0] for s in samples), strict=True)]
            return {"crops": crops, "label": torch.stack([s[1] for s in samples])}

        return DataLoader(self.dataset, batch_size=4, collate_fn=collate)


def test_dict_batches_train_and_other_shapes_are_explained():
    model = DINO(**TINY_VIT, warmup_epochs=0)
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, DictCrops())
    assert trainer.global_step == 2
    with pytest.raises(TypeError, match=r"a DINO training batch must be .*got a tensor of shape \(4, 3, 32, 32\)"):
        model.training_step(torch.zeros(4, 3, 32, 32), 0)


def test_the_first_batch_of_a_user_data_module_is_checked():
    # 20-px global crops cannot be cut into 8-px ViT patches: say so before the first step.
    with pytest.raises(ValueError, match=r"crops of 20x20 in your training batches.*multiple of the patch size 8, e.g. 16 or 24"):
        make_trainer(max_steps=1).fit(DINO(**TINY_VIT, warmup_epochs=0), DictCrops(global_size=20))


def test_trainable_copy_of_the_teacher_backbone():
    model = DINO(**TINY_VIT)
    backbone = model.trainable_backbone()
    assert backbone is not model.teacher.backbone and backbone.training
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(not p.requires_grad for p in model.teacher.backbone.parameters())
    for name, value in model.teacher.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], value)
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)  # training the copy leaves the teacher alone
    assert not torch.equal(next(backbone.parameters()), next(model.teacher.backbone.parameters()))


def test_start_from_pretrained_weights_in_a_local_file_with_a_head_warmup(tmp_path):
    kwargs = dict(TINY_VIT["backbone_kwargs"])
    pretrained = timm.create_model(TINY_VIT["backbone"], num_classes=0, **kwargs)
    weights = {k: v.contiguous() for k, v in pretrained.state_dict().items()}
    save_file(weights, tmp_path / "weights.safetensors")
    backbone_kwargs = {**kwargs, "pretrained": True, "pretrained_cfg_overlay": {"file": str(tmp_path / "weights.safetensors")}}
    model = DINO(**{**TINY_VIT, "backbone_kwargs": backbone_kwargs}, warmup_epochs=0, freeze_last_layer=0,
                 freeze_backbone_steps=2, lr=0.05)
    for network in (model.student, model.teacher):  # both start from the file, the head is new
        for name, value in weights.items():
            assert torch.equal(network.backbone.state_dict()[name], value), name
    head_before = model.student.head.mlp[0].weight.detach().clone()
    make_trainer(max_steps=2).fit(model, CropData(n=8))
    for name, value in weights.items():  # the head warm-up kept the backbones as loaded
        assert torch.equal(model.student.backbone.state_dict()[name], value), name
        assert torch.equal(model.teacher.backbone.state_dict()[name], value), name
    assert not torch.equal(model.student.head.mlp[0].weight, head_before)
    make_trainer(max_steps=3).fit(model, CropData(n=8))  # a new run: step 0 again, warm-up again
    model.hparams.freeze_backbone_steps = 0
    make_trainer(max_steps=1).fit(model, CropData(n=8))
    assert not torch.equal(model.student.backbone.pos_embed, weights["pos_embed"])


def test_export_of_a_run_on_a_user_data_module_records_its_crop_size(tmp_path):
    vit = {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "img_size": 48}}
    model = DINO(**vit, warmup_epochs=0)
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData())  # 32-px global crops, not MultiCropDataModule
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export_backbone(tmp_path / "run.ckpt", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    backbone = load_backbone(out)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())


def test_knn_monitor_takes_labelled_loaders_and_says_when_it_has_none():
    images = torch.randn(24, 3, 32, 32)
    labels = torch.arange(24) % 3
    bank = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    queries = DataLoader(TensorDataset(images[16:], labels[16:]), batch_size=8)
    monitor = KNNMonitor(train_dataloader=bank, val_dataloader=queries, k=3)
    make_trainer(max_steps=1, callbacks=[monitor]).fit(DINO(**TINY_VIT, warmup_epochs=0), CropData())
    assert monitor.last_top1 is not None and 0 <= monitor.last_top1 <= 1
    silent = KNNMonitor()
    with pytest.warns(UserWarning, match=r"KNNMonitor\(train_dataloader=\.\.\., val_dataloader=\.\.\.\)"):
        make_trainer(max_steps=1, callbacks=[silent]).fit(DINO(**TINY_VIT, warmup_epochs=0), CropData())
    assert silent.last_top1 is None
    with pytest.raises(ValueError, match="both train_dataloader and val_dataloader"):
        KNNMonitor(train_dataloader=bank)


def test_monitors_can_be_switched_off():
    model = DINO(**TINY_VIT, monitors=False)
    assert {type(c) for c in model.configure_callbacks()} == {TeacherEMA, RandomStateCallback}
    assert len(DINO(**TINY_VIT).configure_callbacks()) == 5
