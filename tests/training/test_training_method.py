"""The method base: a third method written in the tests (tests/methods/ibot_only.py, iBOT alone)
trains, resumes exactly, exports and is k-NN-evaluated through the public commands without a
line of lifecycle code; every checkpoint records the network it evaluates."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dino import DINO, Distillation, load_backbone
from lightning_dino.io.export import default_network, frozen_networks
from lightning_dino.training.method import Method
from tests.methods import ibot_only
from tests.methods.ibot_only import iBOTOnly
from tests.training.test_training_resume import CONF, ROOT

RUN = ["fit", "--config", str(CONF / "tiny_ibot_only.yaml"), "--seed_everything=0",
       "--trainer.max_epochs=3", "--trainer.logger=false", "--checkpoint.dirpath=checkpoints",
       "--checkpoint.last_every_n_train_steps=1", "--data.synthetic_size=16", "--data.batch_size=4",
       "--model.init_args.lr=0.2", "--model.init_args.momentum_teacher=0.9"]
# The extension points a method may override; anything else it defines is its own.
BASE_HOOKS = {"method_callbacks", "monitor_types", "start_run", "before_optimizer_step",
              "compute_step", "argument_checks", "check_batch_size", "schedule_warnings",
              "resume_warnings"}


def run_cli(args, cwd, returncode=0):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.run([sys.executable, "-m", "lightning_dino", *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=400)
    assert process.returncode == returncode, process.stderr[-4000:]
    return process.stdout


def test_the_third_method_is_small_and_overrides_only_the_extension_points():
    source = Path(ibot_only.__file__).read_text()
    assert len(source.splitlines()) <= 120
    tree = ast.parse(source)
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    defined = {node.name for node in cls.body if isinstance(node, ast.FunctionDef)} - {"__init__"}
    assert defined <= BASE_HOOKS, defined - BASE_HOOKS
    # No Lightning hook of its own: the base runs the batch, checks, checkpoints and logs.
    lightning_hooks = {name for name, _ in inspect.getmembers(Method, inspect.isfunction)
                       if name.startswith(("on_", "training_step", "configure_"))}
    assert not defined & lightning_hooks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trains_resumes_exactly_exports_and_evaluates_through_the_commands(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    dump = ["--trainer.callbacks+=tests.scripts.probes.DumpState", "--trainer.callbacks.out_dir=."]
    run_cli([*RUN, *dump], straight)
    run_cli([*RUN, "--trainer.callbacks+=tests.scripts.probes.KillAtStep", "--trainer.callbacks.step=7"],
            killed, returncode=-9)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    run_cli([*RUN, *dump, "--ckpt_path", "checkpoints/last.ckpt"], killed)
    want = torch.load(straight / "rank0.pt", weights_only=True)
    got = torch.load(killed / "rank0.pt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 12
    assert [row["step"] for row in got["rows"]] == list(range(8, 13))
    for got_row, want_row in zip(got["rows"], want["rows"][7:], strict=True):
        assert torch.equal(got_row["crop_sums"], want_row["crop_sums"]), got_row["step"]
        assert torch.equal(got_row["loss"], want_row["loss"]), got_row["step"]
    for key in ("student", "teacher"):
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), f"{key}.{name}"
    assert not torch.equal(want["teacher"]["backbone.pos_embed"], want["student"]["backbone.pos_embed"])
    assert list(got["centers"]) == ["ibot.loss.center"]
    assert torch.equal(got["centers"]["ibot.loss.center"], want["centers"]["ibot.loss.center"])
    assert torch.count_nonzero(got["centers"]["ibot.loss.center"]) > 0

    last = straight / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["evaluated_network"] == "teacher" and checkpoint["frozen_networks"] == []
    run_cli(["export", "--ckpt", str(last), "--out", "export"], straight)
    model = iBOTOnly.load_from_checkpoint(last).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(straight / "export").eval()(images), model(images))
        torch.testing.assert_close(model(images), model.teacher.backbone(images))
    out = run_cli(["knn", "--ckpt", str(last), "--config", str(CONF / "tiny_ibot_only.yaml"), "--k", "5"],
                  straight)
    assert "k-NN (evaluated network" in out and "top-1" in out


def test_a_method_that_cannot_serve_its_backbone_is_named_by_its_class():
    with pytest.raises(ValueError, match=r"iBOTOnly\(ibot_loss_weight=\.\.\.\) needs patch tokens"):
        iBOTOnly(backbone="test_resnet")
    with pytest.raises(ValueError, match=r"iBOTOnly\(lr=-1\) is invalid"):
        iBOTOnly(lr=-1)


def test_checkpoints_record_the_evaluated_network_and_older_ones_are_read_from_their_keys():
    state = {"ema.backbone.w": torch.zeros(1), "teacher.backbone.w": torch.zeros(1)}
    assert default_network({"state_dict": state}) == "ema"  # 0.2 and older: from the keys
    assert frozen_networks({"state_dict": state}) == ["teacher"]
    assert default_network({"state_dict": {"teacher.backbone.w": torch.zeros(1)}}) == "teacher"
    recorded = {"state_dict": state, "evaluated_network": "student", "frozen_networks": []}
    assert default_network(recorded) == "student" and frozen_networks(recorded) == []
    assert DINO.evaluated_network == "teacher" and DINO.frozen_networks == ()
    assert Distillation.evaluated_network == "ema" and Distillation.frozen_networks == ("teacher",)
