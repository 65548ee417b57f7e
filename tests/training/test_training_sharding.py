"""Sharded training (FSDP2, ``--trainer.strategy fsdp2``) on two gloo CPU ranks against the same
steps under DDP: student, teacher and centres equal within fp32 tolerance, for DINO with iBOT and
KoLeo and for a distillation; sharded checkpoints that resume exactly and export."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_ddp import RUN, free_port

pytestmark = pytest.mark.tier2  # `make test-all`: two-rank runs, about 4 minutes

ROOT = Path(__file__).parents[2]
CONF = ROOT / "tests" / "conf"
PROBES = "tests.scripts.probes"
# Every mechanism active: iBOT (separate head, mask token) and KoLeo, the last-layer freeze in the
# first epoch, layer-wise decay, a clip small enough to act on every tensor.
DINO_FLAGS = ["--model.ibot_loss_weight=1.0", "--model.koleo_loss_weight=0.1", "--model.ibot_separate_head=true",
              "--model.layerwise_decay=0.9", "--model.clip_grad=0.05", "--data.batch_size=4"]
# fp32 on two processes: the sums of a reduce-scatter are ordered differently from an all-reduce's.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def launch(args, cwd, extra_probes=()):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    probes = [f"--trainer.callbacks+={PROBES}.DumpState", f"--trainer.callbacks.out_dir={cwd}", *extra_probes]
    return subprocess.Popen([sys.executable, "-m", "lightning_dino", *args, *probes], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, ok=True):
    _, stderr = process.communicate(timeout=240)
    assert (process.returncode == 0) == ok, stderr[-4000:]
    return stderr


def ranks(folder):
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def ddp_and_sharded(tmp_path, args: list[str]) -> tuple[list, list]:
    """The same two-rank run under DDP and under fsdp2, side by side: each one's per-rank records."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        folder = tmp_path / strategy
        folder.mkdir()
        runs[strategy] = launch([*args, f"--trainer.strategy={strategy}", "--trainer.devices=2"], folder)
    for process in runs.values():
        finish(process)
    return ranks(tmp_path / "ddp"), ranks(tmp_path / "fsdp2")


def assert_same_networks(a, b, keys=("student", "teacher")):
    for key in keys:
        assert a[key].keys() == b[key].keys(), key
        for name, value in a[key].items():
            torch.testing.assert_close(value, b[key][name], **TOLERANCE, msg=f"{key}.{name}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dino_with_ibot_and_koleo_sharded_equals_ddp(tmp_path):
    ddp, sharded = ddp_and_sharded(tmp_path, [*RUN, *DINO_FLAGS])
    assert sharded[0]["global_step"] == ddp[0]["global_step"] == 4
    start = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)
    for rank in (0, 1):
        assert_same_networks(sharded[rank], ddp[rank])
        for name, centre in ddp[rank]["centers"].items():
            torch.testing.assert_close(sharded[rank]["centers"][name], centre, **TOLERANCE, msg=name)
        for row, other in zip(sharded[rank]["rows"], ddp[rank]["rows"], strict=True):
            torch.testing.assert_close(row["loss"], other["loss"], **TOLERANCE)
    assert_same_networks(sharded[0], sharded[1])  # the gathered networks agree across ranks
    assert start["center"].abs().sum() > 0  # the centre moved: its equality is not trivial


# SGD: AdamW turns a gradient of rounding-noise size into a whole step of either sign, and a
# ResNet has such gradients (weights before a BatchNorm); measured with AdamW: 7e-3 apart, with SGD
# 1e-7. The DINO test above covers AdamW on sharded parameters.
DISTILL = ["fit", "--config", str(CONF / "tiny_distill.yaml"), "--seed_everything=0", "--trainer.max_epochs=2",
           "--trainer.logger=false", "--checkpoint.dirpath=checkpoints", "--model.lr=0.256",
           "--model.ema_momentum=0.5", "--model.backbone=test_resnet", "--model.backbone_kwargs={}",
           "--model.clip_grad=0.05", "--model.optimizer=sgd", "--data.synthetic_size=16", "--data.batch_size=4",
           "--data.global_crop_scale=[1.0,1.0]", "--data.hflip_p=0", "--data.color_jitter_p=0",
           "--data.grayscale_p=0", "--data.blur_p=[0,0,0]", "--data.solarize_p=0"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_distilling_a_vit_into_a_resnet_sharded_equals_ddp(tmp_path):
    ddp, sharded = ddp_and_sharded(tmp_path, DISTILL)
    assert sharded[0]["global_step"] == ddp[0]["global_step"] == 4
    for rank in (0, 1):
        assert_same_networks(sharded[rank], ddp[rank], keys=("student", "ema", "teacher"))


SHARDED = [*RUN, *DINO_FLAGS, "--trainer.strategy=fsdp2", "--trainer.devices=2", "--trainer.max_epochs=3"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_then_resume_of_a_sharded_run_ends_bit_identical_and_the_folder_exports(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    signal_probe = [f"--trainer.callbacks+={PROBES}.SignalAtStep", "--trainer.callbacks.step=3"]
    first = launch([*SHARDED, *signal_probe], stopped)
    whole = launch(SHARDED, straight)
    stderr = finish(first, ok=False)
    assert first.returncode == 128 + signal.SIGTERM and "SIGTERM received: saved" in stderr
    finish(whole)
    folder = stopped / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    from lightning_dino.io.export import read_checkpoint

    saved = read_checkpoint(folder)
    assert saved["global_step"] == 4 and "teacher.backbone.pos_embed" in saved["state_dict"]
    resumed = stopped / "resumed"
    resumed.mkdir()
    finish(launch([*SHARDED, "--ckpt_path", str(folder)], resumed))
    got, want = ranks(resumed), ranks(straight)
    for rank in (0, 1):
        assert got[rank]["global_step"] == want[rank]["global_step"] == 6
        for key in ("student", "teacher"):
            for name, value in want[rank][key].items():
                assert torch.equal(got[rank][key][name], value), f"rank {rank} {key}.{name}"
        for name, centre in want[rank]["centers"].items():
            assert torch.equal(got[rank]["centers"][name], centre), name
    moved = (want[0]["teacher"]["backbone.pos_embed"] - saved["state_dict"]["teacher.backbone.pos_embed"]).abs().max()
    assert moved > 1e-4  # the resumed steps changed the teacher: the equality is not the saved state's

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "lightning_dino", "export", "--ckpt", str(folder), "--out",
                          str(tmp_path / "export")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()

    # On one rank: the shards are read into one process's model; a changed network shape stops first.
    one = tmp_path / "one"
    one.mkdir()
    changed = finish(launch([*SHARDED, "--trainer.devices=1", "--model.out_dim=32", "--ckpt_path", str(folder)],
                            one), ok=False)
    assert "--model.out_dim=32 (checkpoint: 64) changes the shape of the saved networks" in changed
    finish(launch([*SHARDED, "--trainer.devices=1", "--ckpt_path", str(folder)], one))
    # Its last epoch, alone: 16 images in batches of 4, 4 steps after the saved 4.
    assert torch.load(one / "rank0.pt", weights_only=False)["global_step"] == 8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_blocks_train_sharded_as_the_eager_ones(tmp_path):
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--model.compile=true"])):
        folder = tmp_path / name
        folder.mkdir()
        runs[name] = launch([*RUN, *DINO_FLAGS, "--trainer.strategy=fsdp2", "--trainer.devices=2", "--model.optimizer=sgd",
                             *flags], folder)
    for process in runs.values():
        finish(process)
    eager, compiled = ranks(tmp_path / "eager"), ranks(tmp_path / "compiled")
    for rank in (0, 1):
        for row, other in zip(compiled[rank]["rows"], eager[rank]["rows"], strict=True):
            torch.testing.assert_close(row["loss"], other["loss"], rtol=1e-4, atol=1e-5)
        assert_same_networks(compiled[rank], eager[rank])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_lightnings_own_strategy_from_python_trains_and_refuses_tensor_parallelism(tmp_path, tensor_parallel):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "own_trainer_sharded.py"),
                           str(tensor_parallel)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if tensor_parallel == 1:
        assert done.returncode == 0 and "global_step 2" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0
        assert "DINO shards data-parallel only" in done.stderr and "strategy='fsdp2'" in done.stderr
