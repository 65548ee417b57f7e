"""A training run's lifecycle: precision of the loss, what Lightning's monitors see, a second fit,
and resuming with changed or unreadable inputs."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import Logger

from lightning_dino import DINO, DINOLoss
from lightning_dino.cli import main
from lightning_dino.eval.diagnostics import collapse_statistics
from lightning_dino.training.resume import settle_epoch_end
from tests.conftest import TINY_VIT, CropData, make_trainer

CONF = Path(__file__).parent / "conf"


# Precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_and_centre_are_fp32_under_autocast(dtype):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 16, 256), torch.randn(2, 16, 256)
    reference = DINOLoss(256)
    want = reference(student, teacher, 0.04)
    under = DINOLoss(256)
    with torch.autocast("cpu", dtype=dtype):
        got = under(student, teacher, 0.04)
    # Without the fp32 guard the pairing einsum runs in 16 bits: 28.625 instead of 28.695 (bf16).
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(under.center, reference.center, rtol=1e-6, atol=0)
    # 16-bit network outputs (what the heads give under autocast) are upcast, not computed in 16 bits.
    with torch.autocast("cpu", dtype=dtype):
        got16 = DINOLoss(256).eval()(student.to(dtype), teacher.to(dtype), 0.04)
    want16 = DINOLoss(256).eval()(student.to(dtype).float(), teacher.to(dtype).float(), 0.04)
    torch.testing.assert_close(got16, want16, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=dtype):
        stats = collapse_statistics(student, teacher, reference.center, 0.1, 0.04)
    for name, value in collapse_statistics(student, teacher, reference.center, 0.1, 0.04).items():
        torch.testing.assert_close(stats[name], value, rtol=1e-6, atol=0, msg=name)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def test_bf16_mixed_training_loss_is_fp32():
    recorder = LossRecorder()
    make_trainer(max_steps=2, precision="bf16-mixed", callbacks=[recorder]).fit(
        DINO(**TINY_VIT, warmup_epochs=0), CropData(batch_size=4, n=8))
    assert [loss.dtype for loss in recorder.losses] == [torch.float32] * 2


# Schedules as Lightning sees them ------------------------------------------------------------


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class UsedValues(Callback):
    """What the optimizer applies at each step (recorded just before the step)."""

    def __init__(self):
        self.rows = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        decay = optimizer.param_groups[0]
        self.rows[trainer.global_step] = (decay["lr"], decay["weight_decay"])


def test_learning_rate_monitor_logs_what_each_step_used():
    used, logger = UsedValues(), MemoryLogger()
    monitor = LearningRateMonitor(logging_interval="step", log_weight_decay=True)
    trainer = make_trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[used, monitor])
    trainer.fit(DINO(**TINY_VIT, warmup_epochs=1), CropData(batch_size=4, n=16))
    # The monitor names each parameter group by its "name": lr-AdamW/decay, lr-AdamW/decay-weight_decay.
    logged = {step: (m["lr-AdamW/decay"], m["lr-AdamW/decay-weight_decay"])
              for step, m in logger.rows if "lr-AdamW/decay" in m}
    assert sorted(used.rows) == sorted(logged) == list(range(8))
    for step, (lr, wd) in used.rows.items():
        assert logged[step] == pytest.approx((lr, wd), rel=1e-12), step
    lrs = [used.rows[s][0] for s in range(8)]
    # Warmup 0 -> peak over steps 0..3, then the cosine from the peak at step 4: 7 distinct values; a
    # monitor one step late would log 0.0 at steps 0 and 1.
    assert lrs[0] == 0.0 and lrs[1] > 0 and len(set(lrs)) == 7


def test_epoch_mean_of_the_loss_is_logged():
    recorder = LossRecorder()
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(DINO(**TINY_VIT, warmup_epochs=0), CropData(batch_size=4, n=16))
    last_epoch = torch.stack(recorder.losses[4:])
    torch.testing.assert_close(trainer.callback_metrics["train/loss_epoch"], last_epoch.mean())
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], last_epoch[-1])


# A second fit --------------------------------------------------------------------------------


class StepState(Callback):
    """Per optimizer step: lr, weight decay, and the centre and teacher as the step starts."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.centre = pl_module.loss.center.clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        decay = optimizer.param_groups[0]
        self.rows.append((trainer.global_step, decay["lr"], decay["weight_decay"], self.centre))


def test_a_second_fit_on_the_same_trainer_continues_like_a_resume():
    torch.manual_seed(0)
    once = DINO(**TINY_VIT, warmup_epochs=1)
    torch.manual_seed(0)
    twice = DINO(**TINY_VIT, warmup_epochs=1)
    straight, split = StepState(), StepState()
    make_trainer(max_epochs=2, callbacks=[straight]).fit(once, CropData(batch_size=4, n=16))
    trainer = make_trainer(max_epochs=1, callbacks=[split])
    trainer.fit(twice, CropData(batch_size=4, n=16))
    trainer.fit_loop.max_epochs = 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*will override existing callbacks")
        trainer.fit(twice, CropData(batch_size=4, n=16))
    # The second fit runs steps 4..7 with the schedules of the 2-epoch run (the run length is the
    # new max_epochs, as with --ckpt_path and a larger --trainer.max_epochs) and keeps the centre.
    assert [row[0] for row in split.rows] == list(range(8))
    for got, want in zip(split.rows[4:], straight.rows[4:], strict=True):
        assert got[1:3] == pytest.approx(want[1:3], rel=1e-12)
    assert split.rows[4][3].abs().max() > 0.1
    torch.testing.assert_close(split.rows[4][3], straight.rows[4][3])


def test_a_fit_with_a_new_trainer_is_a_new_run_from_the_current_weights():
    model = DINO(**TINY_VIT, warmup_epochs=1)
    first, second = StepState(), StepState()
    make_trainer(max_epochs=1, callbacks=[first]).fit(model, CropData(batch_size=4, n=16))
    teacher_after_first = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert model.loss.center.abs().max() > 0.1

    class TeacherAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.teacher = {k: v.clone() for k, v in pl_module.teacher.state_dict().items()}

    at_start = TeacherAtStart()
    make_trainer(max_epochs=1, callbacks=[second, at_start]).fit(model, CropData(batch_size=4, n=16))
    # Schedules from step 0 (lr warmup again) and a centre starting from 0 ...
    assert [row[0] for row in second.rows] == [0, 1, 2, 3]
    for got, want in zip(second.rows, first.rows, strict=True):
        assert got[1:3] == pytest.approx(want[1:3], rel=1e-12)
    assert torch.count_nonzero(second.rows[0][3]) == 0
    # ... but the networks carry over: the teacher starts where the first fit left it.
    for name, value in teacher_after_first.items():
        assert torch.equal(at_start.teacher[name], value), name


# Resuming through the CLI --------------------------------------------------------------------

RUN = ["fit", "--config", str(CONF / "tiny_vit.yaml"), "--data.synthetic_size=16", "--data.batch_size=4"]


@pytest.fixture
def one_epoch_checkpoint(tmp_path, monkeypatch, _bare_argv):
    monkeypatch.chdir(tmp_path)
    main(RUN)
    return tmp_path / "runs" / "dino" / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt"


def test_command_line_wins_on_resume_and_the_changes_are_listed(one_epoch_checkpoint, tmp_path):
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's.*lr: 0\.0005 -> 0\.5; min_lr: 1e-06 -> 0\.001"):
        main([*RUN, "--ckpt_path", str(one_epoch_checkpoint), "--model.lr=0.5", "--model.min_lr=0.001",
              "--trainer.max_epochs=2"])
    saved = yaml.safe_load((tmp_path / "runs" / "dino" / "version_1" / "config.yaml").read_text())
    assert (saved["model"]["lr"], saved["model"]["min_lr"]) == (0.5, 0.001)
    # What the command line does not set comes from the checkpoint (here the whole model).
    main(["fit", "--ckpt_path", str(one_epoch_checkpoint), "--trainer.max_epochs=2",
          *[a for a in RUN[3:]], "--data.dataset=synthetic", "--data.global_crop_size=32",
          "--data.local_crop_size=16", "--data.n_local_crops=2", "--data.synthetic_image_size=32",
          "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"])
    saved = yaml.safe_load((tmp_path / "runs" / "dino" / "version_2" / "config.yaml").read_text())
    assert saved["model"]["backbone_kwargs"]["embed_dim"] == 32 and saved["model"]["out_dim"] == 64


def test_a_shape_change_on_resume_fails_before_training_naming_the_key(one_epoch_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as error:
        main([*RUN, "--ckpt_path", str(one_epoch_checkpoint), "--model.out_dim=32"])
    assert "--model.out_dim=32 (checkpoint: 64)" in str(error.value.code)
    assert not (tmp_path / "runs" / "dino" / "version_1").exists()  # nothing was built or logged
    # The same check guards a Trainer driven from Python, naming the Python argument.
    with pytest.raises(ValueError, match=r"DINO\(hidden_dim=48\) \(checkpoint: 32\)"):
        make_trainer(max_epochs=2).fit(DINO(**{**TINY_VIT, "hidden_dim": 48}), CropData(),
                                       ckpt_path=one_epoch_checkpoint)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "truncated"])
def test_an_unreadable_checkpoint_is_named_without_unsafe_advice(one_epoch_checkpoint, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(one_epoch_checkpoint.read_bytes()[:4000] if content == "truncated" else content)
    with pytest.raises(SystemExit) as error:
        main([*RUN, "--ckpt_path", str(bad)])
    message = str(error.value.code)
    assert f"{bad} is not a readable checkpoint" in message
    assert "weights_only=False" not in message


def test_the_cli_offers_no_optimizer_keys_it_would_ignore(capsys, _bare_argv):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.lr " in out or "--model.lr LR" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


def test_settle_epoch_end_only_changes_end_of_epoch_states(one_epoch_checkpoint):
    checkpoint = torch.load(one_epoch_checkpoint, weights_only=True)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"]["completed"] == 0  # Lightning's end-of-epoch state
    assert settle_epoch_end(checkpoint)
    assert fit_loop["epoch_progress"]["current"]["completed"] == fit_loop["epoch_progress"]["current"]["processed"] == 1
    assert fit_loop["epoch_loop.batch_progress"]["current"]["completed"] == 0
    assert not fit_loop["epoch_loop.batch_progress"]["is_last_batch"]
    assert not settle_epoch_end(checkpoint)  # already settled: nothing to do


def test_only_fit_is_offered_since_dino_has_no_validation_step(capsys, _bare_argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(CONF / "tiny_vit.yaml")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'validate' (choose from 'fit')" in capsys.readouterr().err


def test_last_ckpt_follows_every_epoch_end_even_when_a_monitor_saw_no_improvement(tmp_path):
    from lightning_dino import DINOCheckpoint

    # A constant metric (the teacher temperature) improves only once: top-k saves epoch 0 alone.
    checkpoint = DINOCheckpoint(dirpath=tmp_path, monitor="train/teacher_temp", save_top_k=1, save_last=True)
    trainer = make_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[checkpoint], log_every_n_steps=1)
    trainer.fit(DINO(**TINY_VIT, warmup_epochs=0), CropData(batch_size=4, n=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == trainer.global_step == 6
