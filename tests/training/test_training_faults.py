"""Numerical faults: a NaN stops the run naming the step and keeps the last good checkpoint;
non-finite weights are never written; 16-mixed clips unscaled gradients."""

import hashlib
import io
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision, TorchCheckpointIO

import lightning_dino.training.optimization
from lightning_dino import DINO
from lightning_dino.training.checkpointing import DINOCheckpoint
from tests.conftest import TINY_VIT, CropData, make_trainer


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Fault(Callback):
    """At optimizer step `step`: fingerprint the checkpoints on disk, then break something."""

    def __init__(self, step, dirpath, kind):
        self.step, self.dirpath, self.kind = step, dirpath, kind
        self.hashes = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.kind == "nan_features":
            self.hashes = {p.name: sha256(p) for p in self.dirpath.iterdir()}
            pl_module.student.backbone.register_forward_hook(lambda module, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Runs before the checkpoint callback's own on_train_batch_end (Lightning puts it last).
        if trainer.global_step == self.step and self.kind == "nan_weights":
            self.hashes = {p.name: sha256(p) for p in self.dirpath.iterdir()}
            with torch.no_grad():
                pl_module.student.head.mlp[0].weight[0, 0] = float("inf")


def run_with_fault(tmp_path, kind, step):
    checkpoint = DINOCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", save_top_k=-1, save_last=True,
                                last_every_n_train_steps=1)
    fault = Fault(step, tmp_path, kind)
    trainer = make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint, fault])
    pl.seed_everything(0)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(DINO(**TINY_VIT, warmup_epochs=0), CropData(batch_size=4, n=16))  # 4 steps per epoch
    return str(error.value), fault.hashes


def assert_intact(tmp_path, hashes, step):
    assert {p.name for p in tmp_path.iterdir()} == set(hashes) == {"epoch=0-step=4.ckpt", "last.ckpt"}
    for name, digest in hashes.items():
        assert sha256(tmp_path / name) == digest, f"{name} changed after the fault"
        ckpt = torch.load(tmp_path / name, weights_only=True)
        assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == step
    restored = DINO.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.loss.center.isfinite().all()


def test_nan_loss_stops_with_the_step_and_fixes_and_keeps_the_last_good_checkpoint(tmp_path):
    message, hashes = run_with_fault(tmp_path, "nan_features", step=6)
    assert "non-finite DINO loss" in message and "global step 6, epoch 1" in message
    assert "Trainer(precision='bf16-mixed') or 32" in message and "DINO(lr=...)" in message
    assert_intact(tmp_path, hashes, step=6)


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    message, hashes = run_with_fault(tmp_path, "nan_weights", step=6)
    assert "student.head.mlp.0.weight is NaN or infinite at global step 6" in message
    assert "last.ckpt) is kept" in message
    assert_intact(tmp_path, hashes, step=5)


class Fingerprint(Callback):
    def __init__(self, path):
        self.path, self.digests = path, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path.exists():
            self.digests[trainer.global_step] = sha256(self.path)


@pytest.mark.parametrize("atomic", [True, False])
def test_a_crash_while_writing_last_ckpt_keeps_the_previous_one(tmp_path, monkeypatch, atomic):
    real_save = TorchCheckpointIO.save_checkpoint

    def disk_full_at_step_3(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == 3:  # half the bytes reach the disk, then the write fails
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError("No space left on device")
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full_at_step_3)
    if atomic:
        checkpoint = DINOCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, last_every_n_train_steps=1)
    else:  # for contrast, Lightning's callback hands the writer last.ckpt's final path
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=1)
    fingerprint = Fingerprint(tmp_path / "last.ckpt")
    trainer = make_trainer(max_steps=4, enable_checkpointing=True, callbacks=[checkpoint, fingerprint])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(DINO(**TINY_VIT), CropData(batch_size=4, n=16))
    if atomic:
        assert sha256(tmp_path / "last.ckpt") == fingerprint.digests[2]
        assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
        assert (tmp_path / ".last.ckpt.partial").exists()  # the torn write, beside it
    else:
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "last.ckpt", weights_only=True)


def first_clip_norms(precision_plugins, optimizer):
    """Gradient norms that DINO's per-tensor clip receives at the first optimizer step."""
    seen = []
    real_clip = lightning_dino.training.optimization.clip_gradients_per_tensor

    def recording_clip(params, max_norm):
        if not seen:
            seen.append(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        real_clip(params, max_norm)

    pl.seed_everything(0)
    # A wider head than TINY_VIT's: its tiny bottleneck activations (norm ~1e-3) overflow fp16
    # gradients through the L2 normalisation even unscaled.
    model = DINO(**{**TINY_VIT, "hidden_dim": 512, "bottleneck_dim": 128}, optimizer=optimizer, warmup_epochs=0)
    trainer = make_trainer(max_steps=1, plugins=precision_plugins)
    with mock.patch.object(lightning_dino.training.optimization, "clip_gradients_per_tensor", recording_clip):
        trainer.fit(model, CropData(batch_size=4, n=8))
    return seen[0], trainer


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])  # fused (unscales in step()) and plain
def test_16_mixed_uses_a_grad_scaler_and_clips_unscaled_gradients(optimizer):
    # Lightning turns `precision="16-mixed"` on a CPU into bf16; the plugin forces fp16 + scaler.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fp16, trainer = first_clip_norms([MixedPrecision("16-mixed", "cpu", scaler=scaler)], optimizer)
    assert trainer.precision_plugin.scaler is scaler
    fp32, _ = first_clip_norms(None, optimizer)
    assert fp16.isfinite().all()
    # Scaled gradients would be 1024 times larger; fp16 autocast changes them by about 1%.
    torch.testing.assert_close(fp16, fp32, rtol=0.1, atol=1e-6)
