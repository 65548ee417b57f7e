"""Exact resume: a run SIGKILLed mid-epoch and resumed with `--ckpt_path last` ends exactly where
an uninterrupted run ends; the sampler and the atomic checkpoint writer on their own."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_dino.data.sampler import EpochSampler, ResumableDataLoader
from lightning_dino.training.checkpointing import DINOCheckpoint, _replace

ROOT = Path(__file__).parents[2]
CONF = Path(__file__).parents[1] / "conf"
PROBES = "tests.scripts.probes"

# 16 synthetic images, batch 4: 4 steps per epoch, 12 in all. Every schedule moves: lr warmup over
# epoch 0 then cosine, weight decay, teacher momentum, teacher temperature per epoch, last layer
# frozen in epoch 0, stochastic depth 0.1 and random augmentation. last.ckpt is refreshed every 3
# steps (3, 6, 9) besides the epoch-end checkpoints (4, 8, 12).
RUN = [
    "fit", "--config", str(CONF / "tiny_vit.yaml"), "--seed_everything=0",
    "--data.synthetic_size=16", "--data.batch_size=4", "--trainer.max_epochs=3",
    "--trainer.log_every_n_steps=1", "--model.lr=0.2", "--model.momentum_teacher=0.9",
    "--model.warmup_epochs=1", "--model.warmup_teacher_temp=0.02", "--model.teacher_temp=0.05",
    "--model.warmup_teacher_temp_epochs=2", "--model.drop_path_rate=0.1",
    "--checkpoint.last_every_n_train_steps=3",
]
STEPS = 12


def start(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "lightning_dino", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, returncode=0):
    _, stderr = process.communicate(timeout=150)
    assert process.returncode == returncode, stderr[-3000:]
    return stderr


def dump(out_dir):
    return [f"--trainer.callbacks+={PROBES}.DumpState", f"--trainer.callbacks.out_dir={out_dir}"]


def probe(name, **kwargs):
    return [f"--trainer.callbacks+={PROBES}.{name}", *(f"--trainer.callbacks.{k}={v}" for k, v in kwargs.items())]


def checkpoints_of(run_dir, version=0):
    return run_dir / "runs" / "dino" / f"version_{version}" / "checkpoints"


@pytest.fixture
def local_master(monkeypatch):
    """A free local port for the rendezvous of a 2-process DDP run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the whole 12-step run, its per-step rows and final state (and its epoch files)."""
    run_dir = tmp_path_factory.mktemp("straight")
    finish(start([*RUN, *dump(run_dir / "out")], cwd=run_dir))
    return run_dir, torch.load(run_dir / "out" / "rank0.pt", weights_only=True)


def assert_resumed_run_equals(got, want, first_step, checkpoint):
    """The resumed run made steps first_step..12 on the same images, with the same crops and losses,
    and ends with the same student, teacher and centre, to the bit.

    Exact equality is the only tolerance: both runs execute the same float operations in the same
    order on one CPU thread layout, so any difference (a replayed or skipped batch, another random
    crop, a schedule off by a step, a missed EMA update) shows. The comparison is not trivially
    true: between the checkpoint and the end the teacher, the student and the centre move (checked
    below to be orders of magnitude above float rounding)."""
    assert got["global_step"] == want["global_step"] == STEPS
    assert [row["step"] for row in got["rows"]] == list(range(first_step, STEPS + 1))
    for got_row, want_row in zip(got["rows"], want["rows"][first_step - 1:], strict=True):
        assert torch.equal(got_row["labels"], want_row["labels"]), got_row["step"]
        assert torch.equal(got_row["crop_sums"], want_row["crop_sums"]), got_row["step"]
        assert torch.equal(got_row["loss"], want_row["loss"]), got_row["step"]
    for key in ("student", "teacher"):
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), f"{key}.{name}"
    assert torch.equal(got["center"], want["center"])
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    teacher_moved = max((want["teacher"][n] - saved[f"teacher.{n}"]).abs().max().item()
                        for n in want["teacher"] if want["teacher"][n].is_floating_point())
    center_moved = (want["center"] - saved["loss.center"]).abs().max().item()
    assert teacher_moved > 1e-4 and center_moved > 1e-4, (teacher_moved, center_moved)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_between_checkpoints_then_resume_replays_and_matches(uninterrupted, tmp_path):
    _, want = uninterrupted
    # Killed when the batch after step 7 starts: last.ckpt is step 6, so step 7 is lost and replayed.
    finish(start([*RUN, *probe("KillAtStep", step=7)], cwd=tmp_path), returncode=-9)
    checkpoints = checkpoints_of(tmp_path)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (6, 1)
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["start"] == 2 * 4
    # A torn temporary file from a write that was killed is removed by the next start.
    (checkpoints / ".last.ckpt.partial").write_bytes(b"torn")

    # A resumed run logs to version_1; `--ckpt_path last` still finds version_0's last.ckpt.
    resumed = finish(start([*RUN, *dump(tmp_path / "out"), "--ckpt_path", "last"], cwd=tmp_path))
    assert "not resumable" not in resumed
    assert not (checkpoints / ".last.ckpt.partial").exists()
    assert (checkpoints_of(tmp_path, 1) / "epoch=2-step=12.ckpt").exists()
    got = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    assert_resumed_run_equals(got, want, first_step=7, checkpoint=checkpoints / "last.ckpt")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("signum", "at_step", "saved_step"), [
    (signal.SIGTERM, 5, 6),  # mid-epoch: last.ckpt at the step that was running
    (signal.SIGINT, 7, 8),  # during an epoch's last step: the epoch-end files are written first
])
def test_signal_saves_the_current_step_exits_nonzero_and_resumes_exactly(uninterrupted, tmp_path, signum, at_step,
                                                                         saved_step):
    _, want = uninterrupted
    stderr = finish(start([*RUN, *probe("SignalAtStep", step=at_step, signum=int(signum))], cwd=tmp_path),
                    returncode=128 + signum)
    checkpoints = checkpoints_of(tmp_path)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == saved_step
    assert f"{signal.Signals(signum).name} received: saved" in stderr
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    if saved_step % 4 == 0:
        assert (checkpoints / f"epoch={saved_step // 4 - 1}-step={saved_step}.ckpt").exists()

    finish(start([*RUN, *dump(tmp_path / "out"), "--ckpt_path", "last"], cwd=tmp_path))
    got = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    assert_resumed_run_equals(got, want, first_step=saved_step + 1, checkpoint=checkpoints / "last.ckpt")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("length", [["--trainer.max_epochs=3"], ["--trainer.max_epochs=-1", f"--trainer.max_steps={STEPS}"]],
                         ids=["max_epochs", "max_steps"])
def test_resume_from_an_epoch_checkpoint_matches(uninterrupted, tmp_path, length):
    straight, want = uninterrupted
    epoch_file = checkpoints_of(straight) / "epoch=0-step=4.ckpt"
    finish(start([*RUN, *length, *dump(tmp_path / "out"), "--ckpt_path", str(epoch_file)], cwd=tmp_path))
    got = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    assert_resumed_run_equals(got, want, first_step=5, checkpoint=epoch_file)


def test_sampler_resumes_mid_epoch_and_shards_like_one_big_batch():
    data = list(range(21))
    full = ResumableDataLoader(data, batch_size=4, sampler=EpochSampler(data, seed=3), drop_last=True)
    full.sampler.set_epoch(2)
    batches = [b.tolist() for b in full]
    assert len(batches) == len(full) == 5 and len({i for b in batches for i in b}) == 20

    # Interrupted after 2 batches: the state says where epoch 2 stands; a new loader continues.
    partial = ResumableDataLoader(data, batch_size=4, sampler=EpochSampler(data, seed=3), drop_last=True)
    partial.sampler.set_epoch(2)
    iterator = iter(partial)
    assert [next(iterator).tolist() for _ in range(2)] == batches[:2]
    state = partial.state_dict()
    assert (state["epoch"], state["start"], state["seed"]) == (2, 8, 3)
    fresh = ResumableDataLoader(data, batch_size=4, sampler=EpochSampler(data, seed=0), drop_last=True)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)  # what Lightning does at the start of the resumed epoch
    assert [b.tolist() for b in fresh] == batches[2:]
    fresh.sampler.set_epoch(3)  # the next epoch starts at its beginning
    assert len(list(fresh)) == 5

    # Two ranks with batch 2 take, per step, the same 4 images as one process with batch 4.
    ranks = [ResumableDataLoader(data, batch_size=2, drop_last=True,
                                 sampler=EpochSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    for loader in ranks:
        loader.sampler.set_epoch(2)
    for step, (b0, b1) in enumerate(zip(*ranks, strict=True)):
        assert sorted(b0.tolist() + b1.tolist()) == sorted(batches[step])


def test_loader_is_lazy_and_does_not_touch_the_global_random_state():
    data = list(range(8))
    loader = ResumableDataLoader(data, batch_size=2, sampler=EpochSampler(data, seed=1), drop_last=True)
    iterator = iter(loader)  # Lightning builds the iterator before it calls set_epoch
    loader.sampler.set_epoch(1)
    before = torch.get_rng_state()
    first = next(iterator)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.tolist() == EpochSampler(data, seed=1).order(1)[:2].tolist()
    # Iterating again without set_epoch moves to the next epoch (as a shuffled DataLoader would).
    again = ResumableDataLoader(data, batch_size=8, sampler=EpochSampler(data, seed=1))
    assert next(iter(again)).tolist() != next(iter(again)).tolist()


def test_checkpoint_replace_is_atomic_and_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    partial = tmp_path / ".last.ckpt.partial"
    partial.write_bytes(b"new")
    _replace(str(partial), str(target))
    assert target.read_bytes() == b"new" and not partial.exists()
    # save_last="link": the link is swapped atomically too.
    epoch_file = tmp_path / "epoch=0-step=4.ckpt"
    epoch_file.write_bytes(b"epoch 0")
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *args: None))
    DINOCheckpoint._link_checkpoint(trainer, str(epoch_file), str(target))
    assert target.is_symlink() and target.read_bytes() == b"epoch 0"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="last_every_n_train_steps"):
        DINOCheckpoint(last_every_n_train_steps=-1)


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_to_one_rank_of_a_ddp_run_stops_every_rank_at_one_step(tmp_path, local_master):
    # 32 images, 2 ranks x batch 4: 4 steps per epoch. Only rank 1 gets SIGTERM, during step 2.
    ddp = [*RUN, "--data.synthetic_size=32", "--trainer.strategy=ddp", "--trainer.devices=2",
           "--checkpoint.dirpath=checkpoints", "--trainer.logger=false"]
    stderr = finish(start([*ddp, *probe("SignalAtStep", step=1, rank=1)], cwd=tmp_path), returncode=143)
    assert "SIGTERM received: saved" in stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # both ranks finished step 2 and saved it together
    assert len(last["callbacks"]["RandomStateCallback"]["ranks"]) == 2


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_resume_with_device_augmentation_and_ibot_masks_is_exact(tmp_path, local_master):
    """Crops made on the device and iBOT masks come from each rank's own stream, which the
    checkpoint saves and restores: a 2-rank run stopped by SIGTERM and resumed ends, on each rank,
    exactly where the uninterrupted run ends, and the two ranks drew different crops."""
    # 32 images, 2 ranks x batch 4: 4 steps per epoch, 12 in all.
    ddp = [*RUN, "--data.synthetic_size=32", "--trainer.strategy=ddp", "--trainer.devices=2",
           "--data.augmentation=device", "--model.ibot_loss_weight=1.0"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    finish(start([*ddp, *dump(straight / "out")], cwd=straight))
    finish(start([*ddp, *probe("SignalAtStep", step=5)], cwd=stopped), returncode=143)
    finish(start([*ddp, *dump(stopped / "out"), "--ckpt_path", "last"], cwd=stopped))
    for rank in (0, 1):
        want = torch.load(straight / "out" / f"rank{rank}.pt", weights_only=True)
        got = torch.load(stopped / "out" / f"rank{rank}.pt", weights_only=True)
        assert got["world_size"] == 2
        assert_resumed_run_equals(got, want, first_step=7, checkpoint=checkpoints_of(stopped) / "last.ckpt")
    rows = [torch.load(straight / "out" / f"rank{r}.pt", weights_only=True)["rows"] for r in (0, 1)]
    assert not torch.equal(rows[0][0]["crop_sums"], rows[1][0]["crop_sums"])
