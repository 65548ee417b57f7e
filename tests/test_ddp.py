"""`lightning-dino fit` under 2-process CPU DDP (gloo) against a 1-process run with the same
global batch: same images per step, same synced loss, same centre, teacher and student."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"

# Deterministic crops (the full image, no flips, jitter, blur...), no stochastic depth, so a
# 2 x 4 run and a 1 x 8 run see identical inputs. 16 images: 2 steps per epoch, 4 in all. A high
# lr (peak 0.256 * 8 / 256 = 8e-3, from step 1) and a low teacher momentum (0.5) move the student
# and the teacher far more than the tolerances of the comparison below.
RUN = [
    "fit", "--config", str(CONF / "tiny_vit.yaml"), "--seed_everything=0",
    "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
    "--checkpoint.dirpath=checkpoints", "--model.drop_path_rate=0", "--model.warmup_epochs=1",
    "--model.lr=0.256", "--model.momentum_teacher=0.5",
    "--data.synthetic_size=16", "--data.global_crop_scale=[1.0,1.0]",
    "--data.local_crop_scale=[1.0,1.0]", "--data.hflip_p=0", "--data.color_jitter_p=0",
    "--data.grayscale_p=0", "--data.blur_p=[0,0,0]", "--data.solarize_p=0",
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args, cwd):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    dump = ["--trainer.callbacks+=tests.scripts.probes.DumpStateFromStart", f"--trainer.callbacks.out_dir={cwd}"]
    return subprocess.Popen([sys.executable, "-m", "lightning_dino", *RUN, *args, *dump], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    _, stderr = process.communicate(timeout=170)
    assert process.returncode == 0, stderr[-4000:]


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_with_half_batches_match_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir(), single_dir.mkdir()
    ddp = start(["--trainer.strategy=ddp", "--trainer.devices=2", "--data.batch_size=4"], ddp_dir)
    single = start(["--trainer.devices=1", "--data.batch_size=8"], single_dir)
    finish(ddp)
    finish(single)
    ranks = [torch.load(ddp_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(single_dir / "rank0.pt", weights_only=True)
    assert ranks[0]["world_size"] == 2 and one["world_size"] == 1
    assert ranks[0]["global_step"] == one["global_step"] == 4

    # Teacher, centre (all-reduced) and student are identical on both ranks.
    for key in ("teacher", "student"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name} differs between ranks"
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])

    for step, (row0, row1, row) in enumerate(zip(ranks[0]["rows"], ranks[1]["rows"], one["rows"], strict=True)):
        # The two ranks' batches together are the single process's batch (sharding lines up)...
        assert sorted(torch.cat([row0["labels"], row1["labels"]]).tolist()) == sorted(row["labels"].tolist())
        torch.testing.assert_close(torch.cat([row0["crop_sums"], row1["crop_sums"]], 1).sort(1).values,
                                   row["crop_sums"].sort(1).values)
        # ... each rank's loss is over its half, and the logged loss is their mean (sync_dist).
        assert not torch.allclose(row0["loss"], row1["loss"]), step
        mean = (row0["loss"] + row1["loss"]) / 2
        torch.testing.assert_close(mean, row["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row0["logged_loss"], mean)
        torch.testing.assert_close(row1["logged_loss"], mean)

    # Same centre (mean over both ranks' global crops), teacher and student as one process with
    # the same global batch and learning rate (scaled by 4 x 2 = 8 images). All start from the
    # same weights (same seed); compare how far each run moved them.
    starts = [torch.load(ddp_dir / f"start_rank{r}.pt", weights_only=True) for r in (0, 1)]
    one_start = torch.load(single_dir / "start_rank0.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, value in one_start[key].items():
            assert torch.equal(value, starts[0][key][name]) and torch.equal(value, starts[1][key][name]), name
    assert torch.count_nonzero(one_start["center"]) == 0
    # Tolerance: the two runs reduce the gradients in another order (two half-batch means
    # all-reduced vs one mean), so they differ by fp32 rounding: measured <= 2.4e-7 (two ulps of an
    # O(1) weight) on every parameter after 4 steps, and 2e-8 on the centre. atol = 2e-6 (1e-6 for
    # the centre), while the student moves by 2e-2 and the teacher by 7.5e-3 (asserted > 1000 x
    # atol) and the centre reaches 0.17 (asserted > 1e4 x its atol): a teacher that never moves,
    # a centre that is not all-reduced, a rank that skips a step... all miss by orders of
    # magnitude. Left out: the attention's key bias (middle third of qkv.bias). Its gradient is
    # analytically 0 (the softmax over keys ignores a shift common to all keys), so it gets only
    # rounding noise, which Adam's scale-free update turns into steps of up to the lr that depend
    # on the reduction order (measured 4e-4 apart).
    atol = 2e-6

    def comparable(name, tensor):
        if name.endswith("attn.qkv.bias"):
            q, _, v = tensor.chunk(3)
            return torch.cat([q, v])
        return tensor

    for key in ("student", "teacher"):
        moved = {name: comparable(name, one[key][name] - one_start[key][name]) for name in one_start[key]}
        ddp_moved = {name: comparable(name, ranks[0][key][name] - starts[0][key][name]) for name in one_start[key]}
        assert max(change.abs().max().item() for change in moved.values()) > 1000 * atol, key
        for name, change in moved.items():
            torch.testing.assert_close(ddp_moved[name], change, rtol=0, atol=atol, msg=f"{key}.{name}")
    centre_atol = 1e-6
    assert one["center"].abs().max().item() > 1e4 * centre_atol
    torch.testing.assert_close(ranks[0]["center"], one["center"], rtol=0, atol=centre_atol)
