"""Starting a run from existing weights: a checkpoint of this package (backbone and heads), an export
directory, a timm weights file (timm's or Meta's layout), or timm's own `pretrained` file. Student
and teacher both start as those weights; the file is read once, so the new run loads, resumes,
exports and evaluates after it is deleted (a distillation teacher's weights file too)."""

import json
import warnings

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from lightning_dino import DINO, Distillation, export_backbone, load_backbone
from lightning_dino.io.start_weights import load_start_weights, start_state
from tests.conftest import TINY_VIT, CropData, make_trainer

TINY = {**TINY_VIT, "warmup_epochs": 0, "monitors": False}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    torch.manual_seed(0)
    model = DINO(**TINY)
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, CropData(batch_size=4, n=8))
    folder = tmp_path_factory.mktemp("earlier")
    trainer.save_checkpoint(folder / "run.ckpt")
    export_backbone(folder / "run.ckpt", folder / "export")
    save_file(model.teacher.backbone.state_dict(), folder / "released.safetensors")  # timm's layout
    return folder, {k: v.clone() for k, v in model.teacher.state_dict().items()}


class Snapshot(Callback):
    """The networks as the first step sees them."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            for name in ("student", "teacher"):
                self.seen[name] = {k: v.clone() for k, v in getattr(pl_module, name).state_dict().items()}


@pytest.mark.parametrize(("source", "with_heads"), [("run.ckpt", True), ("export", False),
                                                    ("released.safetensors", False)])
def test_every_source_starts_student_and_teacher_and_is_not_needed_afterwards(earlier_run, tmp_path, source,
                                                                              with_heads):
    folder, teacher = earlier_run
    snapshot = Snapshot()
    model = DINO(**TINY, start_from=str(folder / source), freeze_backbone_steps=1)
    trainer = make_trainer(max_steps=1, callbacks=[snapshot])
    trainer.fit(model, CropData(batch_size=4, n=8))
    for name, value in teacher.items():
        if with_heads or name.startswith("backbone."):
            assert torch.equal(snapshot.seen["student"][name], value), name
            assert torch.equal(snapshot.seen["teacher"][name], value), name
    if not with_heads:  # the heads are new
        assert not torch.equal(snapshot.seen["student"]["head.mlp.0.weight"], teacher["head.mlp.0.weight"])
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    moved = tmp_path / "moved"
    (folder / source).rename(moved)
    try:
        again = DINO.load_from_checkpoint(tmp_path / "new.ckpt")
        assert torch.equal(again.teacher.backbone.pos_embed, model.teacher.backbone.pos_embed)
        make_trainer(max_steps=2).fit(again, CropData(batch_size=4, n=8), ckpt_path=tmp_path / "new.ckpt")
        export_backbone(tmp_path / "new.ckpt", tmp_path / "export")
        assert load_backbone(tmp_path / "export") is not None
        with pytest.raises(FileNotFoundError, match=r"start_from=.*no such file or directory; a run reads it"):
            make_trainer(max_steps=1).fit(DINO(**TINY, start_from=str(folder / source)), CropData(batch_size=4, n=8))
    finally:
        moved.rename(folder / source)


def test_timms_pretrained_file_is_not_needed_to_restore_the_run(earlier_run, tmp_path):
    folder, teacher = earlier_run
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes((folder / "released.safetensors").read_bytes())
    kwargs = {**TINY["backbone_kwargs"], "pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}
    model = DINO(**{**TINY, "backbone_kwargs": kwargs})
    assert torch.equal(model.student.backbone.pos_embed, teacher["backbone.pos_embed"])  # read when built
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData(batch_size=4, n=8))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    weights.unlink()
    DINO.load_from_checkpoint(tmp_path / "run.ckpt")  # no FileNotFoundError
    export_backbone(tmp_path / "run.ckpt", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "pretrained" not in config["model_args"] and str(weights) not in json.dumps(config)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "run.ckpt").eval()(images), model.eval()(images))
    with pytest.raises(FileNotFoundError, match=r"backbone_kwargs=.*the weights file .* does not exist"):
        make_trainer(max_steps=1).fit(DINO(**{**TINY, "backbone_kwargs": kwargs}), CropData(batch_size=4, n=8))


def test_a_distillation_teacher_from_a_timm_weights_file_is_not_needed_to_restore_the_run(tmp_path):
    resnet = timm.create_model("resnet18", num_classes=0, channels=[16, 16, 32, 64])
    weights = tmp_path / "teacher.safetensors"
    save_file(resnet.state_dict(), weights)
    kwargs = {"channels": [16, 16, 32, 64], "pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}
    model = Distillation("resnet18", teacher_kwargs=kwargs, backbone="test_resnet", warmup_epochs=0, monitors=False)
    assert torch.equal(model.teacher.backbone.conv1.weight, resnet.conv1.weight)
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData(batch_size=4, n=8))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    weights.unlink()
    again = Distillation.load_from_checkpoint(tmp_path / "run.ckpt")  # before: a bare FileNotFoundError
    assert torch.equal(again.teacher.backbone.conv1.weight, resnet.conv1.weight)  # from the checkpoint
    with pytest.raises(FileNotFoundError, match=r"teacher_kwargs=.*does not exist"):
        make_trainer(max_steps=1).fit(
            Distillation("resnet18", teacher_kwargs=kwargs, backbone="test_resnet", monitors=False),
            CropData(batch_size=4, n=8))


def test_weights_of_another_backbone_are_refused_and_new_heads_listed(earlier_run):
    folder, _ = earlier_run
    other = DINO(**{**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "depth": 3}})
    state, with_heads = start_state(folder / "run.ckpt", "vit_tiny_patch16_224", None, 0)
    assert with_heads
    with pytest.raises(ValueError, match=r"start_from=\.\.\.\): its backbone does not fit this run's"):
        load_start_weights(other.student, other.teacher, state, other)
    fresh = DINO(**TINY_VIT, ibot_loss_weight=1.0, ibot_separate_head=True)
    new = load_start_weights(fresh.student, fresh.teacher, state, fresh)
    assert "mask_token" in new and any(k.startswith("patch_head.") for k in new)
    assert not any(k.startswith(("backbone.", "head.")) for k in new)


def test_a_released_dinov2_file_in_metas_layout_starts_the_backbone(tmp_path):
    """Meta's DINOv2 .pth (register_tokens, the class token's position inside pos_embed, mask_token),
    read by timm's own converter for the run's timm name."""
    kwargs = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2}
    released = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **kwargs)
    timm_state = released.state_dict()
    meta = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta |= {"register_tokens": timm_state["reg_token"], "cls_token": timm_state["cls_token"],
             "pos_embed": torch.cat([torch.zeros(1, 1, 32), timm_state["pos_embed"]], dim=1),
             "mask_token": torch.zeros(1, 32)}
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = DINO(backbone="vit_small_patch14_reg4_dinov2", backbone_kwargs=kwargs, out_dim=64, hidden_dim=32,
                 bottleneck_dim=16, start_from=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    for name, value in timm_state.items():
        assert torch.equal(model.student.backbone.state_dict()[name], value), name
        assert torch.equal(model.teacher.backbone.state_dict()[name], value), name


def test_the_warm_up_trains_the_new_heads_against_a_frozen_backbone_then_ramps_its_lr(earlier_run):
    folder, teacher = earlier_run
    model = DINO(**{**TINY, "lr": 0.05}, start_from=str(folder / "export"), freeze_backbone_steps=3,
                 backbone_warmup_steps=4)
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            groups = trainer.optimizers[0].param_groups
            seen.append({
                "equal": all(torch.equal(s, t) for s, t in zip(pl_module.student.backbone.parameters(),
                                                               pl_module.teacher.backbone.parameters(), strict=True)),
                "backbone_lr": next(g["lr"] for g in groups if g["backbone"]),
                "head_lr": next(g["lr"] for g in groups if not g["backbone"]),
                "pos_embed": pl_module.student.backbone.pos_embed.detach().clone(),
            })

    make_trainer(max_steps=8, callbacks=[Record()]).fit(model, CropData(batch_size=4, n=32))
    assert [row["equal"] for row in seen[:3]] == [True] * 3  # bit-identical while frozen
    assert all(torch.equal(row["pos_embed"], teacher["backbone.pos_embed"]) for row in seen[:3])
    assert not seen[5]["equal"]  # then the backbone trains
    # The lr the next step uses: 0 during the 3 frozen steps, then (k + 1) / 4 of the heads' lr.
    ratios = [row["backbone_lr"] / row["head_lr"] for row in seen]
    assert ratios[:2] == [0.0, 0.0] and ratios[2:6] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and ratios[7] == 1.0


def test_a_pretrained_backbone_with_new_heads_and_no_warm_up_is_warned_naming_the_key(earlier_run):
    folder, _ = earlier_run
    with pytest.warns(UserWarning, match=r"heads are new, with DINO\(freeze_backbone_steps=0\).*"
                                         r"DINO\(freeze_backbone_steps=500\)"):
        make_trainer(max_steps=1).fit(DINO(**TINY, start_from=str(folder / "released.safetensors")),
                                      CropData(batch_size=4, n=8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*heads are new.*")
        make_trainer(max_steps=1).fit(DINO(**TINY, start_from=str(folder / "run.ckpt")), CropData(batch_size=4, n=8))
