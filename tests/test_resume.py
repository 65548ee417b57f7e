"""Exact resume: a run SIGKILLed mid-epoch and resumed with `--ckpt_path last` ends exactly where
an uninterrupted run ends; the sampler and the atomic checkpoint writer on their own."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_dino.checkpointing import DINOCheckpoint, _replace
from lightning_dino.data.sampler import EpochSampler, ResumableDataLoader

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"
PROBES = "tests.scripts.probes"

# 16 synthetic images, batch 4: 4 steps per epoch, 8 in all. Every schedule moves: lr warmup over
# epoch 0 then cosine, weight decay, teacher momentum, teacher temperature per epoch, last layer
# frozen in epoch 0, stochastic depth 0.1 and random augmentation.
RUN = [
    "fit", "--config", str(CONF / "tiny_vit.yaml"), "--seed_everything=0",
    "--data.synthetic_size=16", "--data.batch_size=4", "--trainer.max_epochs=2",
    "--trainer.log_every_n_steps=1",
    "--model.warmup_epochs=1", "--model.warmup_teacher_temp=0.02", "--model.teacher_temp=0.05",
    "--model.warmup_teacher_temp_epochs=2", "--model.drop_path_rate=0.1",
    "--checkpoint.last_every_n_train_steps=3",
]


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    uninterrupted = start([*RUN, *dump(straight / "out")], cwd=straight)
    # Killed when the batch after step 6 starts: epoch 1, 2 of 4 batches done; last.ckpt is step 6.
    crash = start([*RUN, f"--trainer.callbacks+={PROBES}.KillAtStep", "--trainer.callbacks.step=6"], cwd=killed)
    finish(uninterrupted)
    finish(crash, returncode=-9)
    checkpoints = killed / "runs" / "dino" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (6, 1)
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["start"] == 2 * 4

    # A resumed run logs to version_1; `--ckpt_path last` still finds version_0's last.ckpt.
    resumed = finish(start([*RUN, *dump(killed / "out"), "--ckpt_path", "last"], cwd=killed))
    assert "not resumable" not in resumed
    assert (killed / "runs" / "dino" / "version_1" / "checkpoints" / "epoch=1-step=8.ckpt").exists()

    want = torch.load(straight / "out" / "rank0.pt", weights_only=True)
    got = torch.load(killed / "out" / "rank0.pt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 8
    # The resumed run made steps 7 and 8 on the same images with the same crops and losses...
    assert [row["step"] for row in got["rows"]] == [7, 8]
    for got_row, want_row in zip(got["rows"], want["rows"][-2:], strict=True):
        assert torch.equal(got_row["labels"], want_row["labels"])
        torch.testing.assert_close(got_row["crop_sums"], want_row["crop_sums"])
        torch.testing.assert_close(got_row["loss"], want_row["loss"])
    # ... and ends with the same student, teacher and centre.
    torch.testing.assert_close(got["student"], want["student"])
    torch.testing.assert_close(got["teacher"], want["teacher"])
    torch.testing.assert_close(got["center"], want["center"])


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
