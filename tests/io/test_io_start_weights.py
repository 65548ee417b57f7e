"""Starting a run from an earlier run's checkpoint (DINOv3's later phases): the student and the
teacher both start as the checkpoint's evaluated network, heads included, the rest afresh; the
file is read once, so the new run loads and resumes after it is deleted."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO
from lightning_dino.io.start_weights import load_start_weights
from tests.conftest import TINY_VIT, CropData, make_trainer


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    torch.manual_seed(0)
    model = DINO(**TINY_VIT, warmup_epochs=0, monitors=False)
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, CropData(batch_size=4, n=8))
    path = tmp_path_factory.mktemp("earlier") / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.teacher.state_dict().items()}


def test_a_run_starts_from_the_checkpoints_teacher_and_needs_the_file_only_then(earlier_run, tmp_path):
    path, teacher = earlier_run
    copy = tmp_path / "start.ckpt"
    copy.write_bytes(path.read_bytes())
    model = DINO(**TINY_VIT, warmup_epochs=0, monitors=False, start_from=str(copy), ibot_loss_weight=1.0)
    at_start = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                for name in ("student", "teacher"):
                    at_start[name] = {k: v.clone() for k, v in getattr(pl_module, name).state_dict().items()}

    trainer = make_trainer(max_steps=1, callbacks=[Snapshot()])
    trainer.fit(model, CropData(batch_size=4, n=8))
    for name, value in teacher.items():  # backbone and DINO head, into both networks
        assert torch.equal(at_start["student"][name], value), name
        assert torch.equal(at_start["teacher"][name], value), name
    assert "mask_token" not in teacher  # the earlier run had no iBOT: its token starts fresh
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    copy.unlink()
    again = DINO.load_from_checkpoint(tmp_path / "new.ckpt")  # without the start file
    assert torch.equal(again.teacher.backbone.pos_embed, model.teacher.backbone.pos_embed)
    resumed = make_trainer(max_steps=2)
    resumed.fit(again, CropData(batch_size=4, n=8), ckpt_path=tmp_path / "new.ckpt")
    assert resumed.global_step >= 1  # resumed without the start file (start_run is not called)


def test_a_checkpoint_of_another_backbone_or_a_missing_file_is_named(earlier_run, tmp_path):
    path, _ = earlier_run
    other = DINO(**{**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "depth": 3}})
    with pytest.raises(ValueError, match=r"start_from=.*its backbone does not fit this run's"):
        load_start_weights(other.student, other.teacher, path, other)
    with pytest.raises(FileNotFoundError, match=r"DINO\(start_from='nowhere.ckpt'\): no such file"):
        DINO(**TINY_VIT, start_from="nowhere.ckpt").start_run()
    fresh = DINO(**TINY_VIT, ibot_loss_weight=1.0, ibot_separate_head=True)
    assert {"mask_token"} <= set(load_start_weights(fresh.student, fresh.teacher, path, fresh))
