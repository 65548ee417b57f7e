import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dino import DINO, TeacherEMA, ema_update
from tests.conftest import TINY_VIT, CropData, make_trainer


def test_ema_update_matches_formula_over_all_parameters():
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher[1].weight.requires_grad_(False)  # frozen parameters are averaged too
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_ema_rejects_mismatched_architectures():
    with pytest.raises(ValueError, match="same architecture"):
        ema_update(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), 0.9)


def test_teacher_is_separate_frozen_copy_not_in_optimizer():
    model = DINO(**TINY_VIT)
    assert model.teacher is not model.student
    assert model.teacher.backbone is not model.student.backbone
    for (name, t), (_, s) in zip(model.teacher.state_dict().items(), model.student.state_dict().items(), strict=True):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), name
    assert all(not p.requires_grad for p in model.teacher.parameters())
    configured = model.configure_optimizers()  # an optimizer, or a dict with its scheduler
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert optimized == {id(p) for p in model.student.parameters() if p.requires_grad}


def test_teacher_has_no_drop_path_student_does():
    model = DINO(**TINY_VIT, drop_path_rate=0.1)
    student_rates = [b.drop_path1.drop_prob for b in model.student.backbone.blocks if hasattr(b.drop_path1, "drop_prob")]
    assert student_rates and max(student_rates) == pytest.approx(0.1)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.teacher.backbone.blocks)


class GradientProbe(Callback):
    """After the backward of a real `training_step`: which parameters hold gradients."""

    def __init__(self):
        self.checked = False

    def on_after_backward(self, trainer, pl_module):
        assert all(not p.requires_grad for p in pl_module.teacher.parameters())
        assert all(p.grad is None for p in pl_module.teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.student.parameters())
        self.checked = True


def test_teacher_gets_no_gradient_in_a_step():
    model = DINO(**TINY_VIT, warmup_epochs=0)
    calls = []

    def record_grad_mode(module, args):
        calls.append({"grad_enabled": torch.is_grad_enabled()})

    def record_output(module, args, output):
        calls[-1].update(requires_grad=output.requires_grad, grad_fn=output.grad_fn)

    model.teacher.register_forward_pre_hook(record_grad_mode)
    model.teacher.register_forward_hook(record_output)
    probe = GradientProbe()
    trainer = make_trainer(max_steps=1, callbacks=[probe])
    trainer.fit(model, CropData(batch_size=4, n=4))
    assert probe.checked and trainer.global_step == 1
    # training_step called the teacher under no_grad, and its output has no graph.
    assert calls and all(call == {"grad_enabled": False, "requires_grad": False, "grad_fn": None} for call in calls)


class RecordingEMA(TeacherEMA):
    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = trainer.global_step
        moved = before != self._last_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if moved:
            self.steps.append(before)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_once_per_optimizer_step(accumulate):
    model = DINO(**TINY_VIT, warmup_epochs=0)
    recorder = RecordingEMA()
    model.configure_callbacks = lambda: [recorder]
    trainer = make_trainer(accumulate_grad_batches=accumulate)
    trainer.fit(model, CropData(batch_size=4, n=16))
    assert recorder.steps == list(range(1, trainer.global_step + 1))
    assert trainer.global_step == 4 // accumulate


class TeacherSnapshots(Callback):
    """Student and teacher at the start of every batch and at the end of training.

    Snapshot k + 1 is taken after optimizer step k and its EMA (the EMA runs in a module callback,
    after this trainer callback's on_train_batch_end, so the next batch start is the first look).
    """

    def __init__(self):
        self.rows = []

    def snapshot(self, pl_module):
        self.rows.append(([p.detach().clone() for p in pl_module.student.parameters()],
                          [p.detach().clone() for p in pl_module.teacher.parameters()]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshot(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.snapshot(pl_module)


def cosine_momentum(step, total, base):
    """The reference's momentum schedule: cosine_scheduler(base, 1, epochs, niter)[step]."""
    return 1 + 0.5 * (base - 1) * (1 + math.cos(math.pi * step / total))


def test_teacher_moves_by_ema_after_a_step():
    base, steps = 0.5, 4
    # Peak lr 0.5 * 4 / 256 = 7.8e-3 from step 0 (no warmup), last layer trained from step 0: every
    # student parameter moves by up to ~lr a step, and with m ~ 0.5 the teacher by about half that.
    model = DINO(**TINY_VIT, drop_path_rate=0.0, lr=0.5, warmup_epochs=0, momentum_teacher=base,
                 freeze_last_layer=0)
    snapshots = TeacherSnapshots()
    trainer = make_trainer(max_steps=steps, callbacks=[snapshots])
    trainer.fit(model, CropData(batch_size=4, n=4 * steps))
    assert trainer.global_step == steps and len(snapshots.rows) == steps + 1

    # Tolerances: the EMA of fp32 O(1) weights rounds at ~1e-7 (an ulp at 1): tol = 1e-6. The
    # teacher moves by 4e-3, 4.6e-3, 2.6e-3, 6.5e-4 in the 4 steps (measured; asserted > 100 x tol,
    # the momentum rises and the lr decays), so a skipped EMA misses by >= 650 x tol. The momentum
    # of step k is m_k = cosine(k): m_0 = 0.5, m_1 = 0.573; indexing it by the step count instead
    # of step - 1 uses m_1 at step 0, a miss of 0.07 x |teacher - student| (~ 1e-3) >> tol, and
    # the momentum fitted from the weights (measured within 2e-7, asserted within 1e-5) is 0.07 off.
    tol = 1e-6
    expected_m = [cosine_momentum(k, steps, base) for k in range(steps)]
    assert expected_m[0] == base and expected_m[1] - expected_m[0] > 0.05
    for k in range(steps):
        (_, teacher), (student_after, teacher_after) = snapshots.rows[k], snapshots.rows[k + 1]
        moved = max((a - b).abs().max().item() for a, b in zip(teacher_after, teacher, strict=True))
        assert moved > 100 * tol, (k, moved)
        # The momentum the weights imply: teacher_after - s = m (teacher - s), least squares.
        gap = torch.cat([(t - s).flatten() for t, s in zip(teacher, student_after, strict=True)])
        new_gap = torch.cat([(t - s).flatten() for t, s in zip(teacher_after, student_after, strict=True)])
        fitted = (new_gap @ gap / (gap @ gap)).item()
        assert fitted == pytest.approx(expected_m[k], abs=1e-5), (k, fitted, expected_m)
        m = expected_m[k]
        for i, (t_after, t, s) in enumerate(zip(teacher_after, teacher, student_after, strict=True)):
            torch.testing.assert_close(t_after, m * t + (1 - m) * s, rtol=0, atol=tol, msg=f"step {k} param {i}")
