import copy

import pytest
import torch

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
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert optimized == {id(p) for p in model.student.parameters() if p.requires_grad}


def test_teacher_has_no_drop_path_student_does():
    model = DINO(**TINY_VIT, drop_path_rate=0.1)
    student_rates = [b.drop_path1.drop_prob for b in model.student.backbone.blocks if hasattr(b.drop_path1, "drop_prob")]
    assert student_rates and max(student_rates) == pytest.approx(0.1)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.teacher.backbone.blocks)


def test_teacher_gets_no_gradient_in_a_step():
    model = DINO(**TINY_VIT)
    crops, _ = next(iter(CropData().train_dataloader()))
    with torch.no_grad():
        teacher_out = model.teacher(crops[:2])
    model.loss(model.student(crops), teacher_out, 0.04).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())


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


def test_teacher_moves_by_ema_after_a_step():
    model = DINO(**TINY_VIT, warmup_epochs=0, momentum_teacher=0.5, freeze_last_layer=0)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData(batch_size=4, n=4))
    # Step 0 of a 1-step cosine run uses m = momentum_teacher exactly.
    for name, value in model.teacher.named_parameters():
        expected = 0.5 * teacher_before[name] + 0.5 * dict(model.student.named_parameters())[name]
        torch.testing.assert_close(value, expected, msg=name)
