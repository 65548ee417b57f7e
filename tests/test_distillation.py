"""Distillation: every teacher source and objective trains, the teacher stays frozen to the bit,
bad teacher paths fail naming them, the student's EMA is what forward and export give, 2-rank
DDP and exact resume."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino import DINO, Distillation, KNNMonitor, export_backbone, load_backbone
from lightning_dino.eval import evaluated_backbone, knn_accuracy
from tests.conftest import CropData, make_trainer

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"
STUDENT = {"backbone": "test_resnet", "warmup_epochs": 0, "monitors": False, "lr": 0.05}
TIMM_TEACHER = {"teacher": "resnet18", "teacher_kwargs": {"channels": [16, 16, 32, 64]}}


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A DINO checkpoint of a tiny BatchNorm ResNet after 2 steps, and its export directory."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    dino = DINO(backbone="test_resnet", out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_epochs=0,
                freeze_last_layer=0, monitors=False)
    trainer = make_trainer(max_steps=2)
    trainer.fit(dino, datamodule=CropData())
    trainer.save_checkpoint(folder / "dino.ckpt")
    export_backbone(folder / "dino.ckpt", folder / "export")
    return folder / "dino.ckpt", folder / "export"


def fit(model, steps=3, **trainer_kwargs):
    trainer = make_trainer(max_steps=steps, **trainer_kwargs)
    trainer.fit(model, datamodule=CropData(n=16, n_local=2))
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_frozen_after_fit(model, trainer, before):
    """No gradient, never in the optimizer, eval mode, weights and buffers identical to the bit."""
    assert not any(p.requires_grad for p in model.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.teacher.parameters()}
    assert not optimised & {id(p) for p in model.ema.parameters()}
    assert not any(m.training for m in model.teacher.modules())
    after = model.teacher.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


@pytest.mark.parametrize(("source", "objective", "resolved"), [
    ("checkpoint", "dino", "dino"),
    ("checkpoint", None, "features"),
    ("export", None, "features"),
    ("timm", None, "features"),
    ("module", None, "features"),
])
def test_every_teacher_source_and_objective_trains_with_a_frozen_teacher(teacher_files, source, objective,
                                                                         resolved):
    checkpoint, export = teacher_files
    teacher = {"checkpoint": {"teacher": str(checkpoint)}, "export": {"teacher": str(export)},
               "timm": TIMM_TEACHER, "module": {"teacher": timm.create_model("test_resnet", num_classes=0)}}[source]
    chosen = {} if objective is None else {"objective": objective}  # None: the default
    model = Distillation(**teacher, **STUDENT, **chosen)
    assert model.objective.name == resolved
    if source == "checkpoint":  # the DINO run's EMA teacher, bit for bit
        want = load_backbone(checkpoint, "teacher").state_dict()
        assert all(torch.equal(v, model.teacher.backbone.state_dict()[k]) for k, v in want.items())
    before, student_before = snapshot(model.teacher), snapshot(model.student)
    trainer = fit(model)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_frozen_after_fit(model, trainer, before)
    moved = [not torch.equal(v, model.student.state_dict()[k]) for k, v in student_before.items()]
    assert any(moved)
    # BatchNorm running statistics of the teacher exist and did not move (checked above); the
    # student's did, and the EMA copied them.
    assert any("running_mean" in k for k in before)
    for name, value in model.student.state_dict().items():
        if "running_" in name:
            assert torch.equal(model.ema.state_dict()[name], value), name


def test_the_dino_objective_starts_from_the_teacher_run_centre_and_temperature(teacher_files):
    checkpoint, _ = teacher_files
    saved = torch.load(checkpoint, weights_only=True)
    model = Distillation(str(checkpoint), **STUDENT, objective="dino")
    torch.testing.assert_close(model.loss.center, saved["state_dict"]["loss.center"])
    assert model.objective.teacher_temp == saved["hyper_parameters"]["teacher_temp"]
    assert model.student.head.last_layer.weight.shape == model.teacher.head.last_layer.weight.shape
    with pytest.raises(ValueError, match="objective"):
        Distillation(**TIMM_TEACHER, **STUDENT, objective="dino")


def test_a_bad_teacher_path_fails_before_training_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Distillation(str(missing), **STUDENT)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(torn)):
        Distillation(str(torn), **STUDENT)
    empty = tmp_path / "empty_export"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        Distillation(str(empty), **STUDENT)


class SizeRecorder(nn.Module):
    """A headless teacher that records the sizes of the images it sees."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.num_features = 8
        self.sizes = []

    def forward(self, images):
        self.sizes.append((len(images), *images.shape[-2:]))
        return self.proj(images.mean(dim=(2, 3)))


def test_teacher_sees_all_global_crops_in_one_call_resized_to_teacher_image_size():
    teacher = SizeRecorder()
    model = Distillation(teacher, **STUDENT, teacher_image_size=48)
    fit(model, steps=2)
    assert teacher.sizes == [(2 * 4, 48, 48)] * 2  # 2 global crops x batch 4, one call per step
    assert not model.student.map_projection  # a module without a feature map: pooled only


def test_forward_and_export_give_the_student_ema(teacher_files, tmp_path):
    checkpoint, _ = teacher_files
    model = Distillation(str(checkpoint), **STUDENT, objective="features", ema_momentum=0.5)
    trainer = fit(model)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images), model.ema.backbone(images))
    assert not torch.equal(model(images), model.student.backbone(images))
    trainer.save_checkpoint(tmp_path / "distilled.ckpt")
    out = export_backbone(tmp_path / "distilled.ckpt", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["source"] == "ema"
    weights = load_file(out / "model.safetensors")
    for name, value in model.ema.backbone.state_dict().items():
        assert torch.equal(weights[name], value), name
    for path in (tmp_path / "distilled.ckpt", out):
        loaded = load_backbone(path).eval()
        torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(ValueError, match="trained against a frozen teacher"):
        load_backbone(tmp_path / "distilled.ckpt", "teacher")
    # A distillation checkpoint is itself a teacher: its student EMA, without a head.
    again = Distillation(str(tmp_path / "distilled.ckpt"), **STUDENT)
    assert again.objective.name == "features"
    torch.testing.assert_close(again.teacher.backbone(images), model(images))


def test_knn_monitor_evaluates_the_student_ema_not_the_frozen_teacher(teacher_files):
    """The k-NN logged during distillation is the student EMA's: independently recomputed."""
    checkpoint, _ = teacher_files
    torch.manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32), torch.arange(24) % 3
    bank = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    queries = DataLoader(TensorDataset(images[16:], labels[16:]), batch_size=8)
    monitor = KNNMonitor(k=3, train_dataloader=bank, val_dataloader=queries)
    model = Distillation(str(checkpoint), **STUDENT, objective="features", ema_momentum=0.5)
    calls = []
    model.ema.backbone.register_forward_hook(lambda *_: calls.append(1))
    fit(model, steps=3, callbacks=[monitor])
    assert evaluated_backbone(model) is model.ema.backbone
    assert len(calls) == 3  # 2 bank batches and 1 query batch, once, at the last epoch end
    model.eval()
    with torch.no_grad():
        bank_features, query_features = model.ema.backbone(images[:16]), model.ema.backbone(images[16:])
    expected = knn_accuracy(bank_features, labels[:16], query_features, labels[16:], k=3,
                            temperature=0.07)
    assert (monitor.last_top1, monitor.last_top5) == pytest.approx(expected)


def test_the_eval_mode_warning_is_silenced_for_the_teacher_only():
    """Lightning's "module(s) in eval mode" warning: not for the frozen teacher, still for a
    student module left in eval mode."""
    model = Distillation(SizeRecorder(), **STUDENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, steps=1)
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    model = Distillation(SizeRecorder(), **STUDENT)
    model.student.projection.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, steps=1)
    assert [w for w in caught if "in eval mode" in str(w.message)]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args, cwd, returncode=0):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run([sys.executable, "-m", "lightning_dino", *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=400)
    assert process.returncode == returncode, process.stderr[-4000:]
    return process.stderr


RUN = ["fit", "--config", str(CONF / "tiny_distill.yaml"), "--seed_everything=0", "--trainer.max_epochs=2",
       "--trainer.logger=false", "--checkpoint.dirpath=checkpoints", "--model.lr=0.256",
       "--model.ema_momentum=0.5", "--model.drop_path_rate=0", "--data.synthetic_size=16", "--data.global_crop_scale=[1.0,1.0]",
       "--data.hflip_p=0", "--data.color_jitter_p=0", "--data.grayscale_p=0", "--data.blur_p=[0,0,0]",
       "--data.solarize_p=0"]


def dump(out_dir):
    return ["--trainer.callbacks+=tests.scripts.probes.DumpState", f"--trainer.callbacks.out_dir={out_dir}"]


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_gloo_ranks_with_half_batches_match_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir(), single_dir.mkdir()
    run_cli([*RUN, *dump(ddp_dir), "--trainer.strategy=ddp", "--trainer.devices=2", "--data.batch_size=4"], ddp_dir)
    run_cli([*RUN, *dump(single_dir), "--trainer.devices=1", "--data.batch_size=8"], single_dir)
    ranks = [torch.load(ddp_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(single_dir / "rank0.pt", weights_only=True)
    assert ranks[0]["world_size"] == 2 and ranks[0]["global_step"] == one["global_step"] == 4
    for key in ("teacher", "student", "ema"):
        for name, value in one[key].items():
            assert torch.equal(ranks[0][key][name], ranks[1][key][name]), f"{key}.{name} differs between ranks"
            # Summed gradients of two half batches round differently from one whole batch, and lr
            # 0.256 amplifies it over 4 steps (measured: 6e-5); a rank that trained on its own
            # gradients alone would be off by orders of magnitude more.
            torch.testing.assert_close(ranks[0][key][name], value, rtol=1e-3, atol=2e-4)
    for row0, row1, row in zip(ranks[0]["rows"], ranks[1]["rows"], one["rows"], strict=True):
        torch.testing.assert_close((row0["loss"] + row1["loss"]) / 2, row["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row0["logged_loss"], row["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    every = ["--checkpoint.last_every_n_train_steps=1", "--trainer.max_epochs=3", "--data.batch_size=4"]
    run_cli([*RUN, *every, *dump(straight)], straight)
    run_cli([*RUN, *every, "--trainer.callbacks+=tests.scripts.probes.KillAtStep",
             "--trainer.callbacks.step=6"], killed, returncode=-9)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    run_cli([*RUN, *every, *dump(killed), "--ckpt_path", "checkpoints/last.ckpt"], killed)
    want = torch.load(straight / "rank0.pt", weights_only=True)
    got = torch.load(killed / "rank0.pt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 12
    for got_row, want_row in zip(got["rows"], want["rows"][6:], strict=True):
        assert torch.equal(got_row["crop_sums"], want_row["crop_sums"]), got_row["step"]
        assert torch.equal(got_row["loss"], want_row["loss"]), got_row["step"]
    for key in ("student", "ema", "teacher"):
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), f"{key}.{name}"
