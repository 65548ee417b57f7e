"""What a :class:`~lightning_dino.Distillation` student learns from its frozen teacher.

An objective is one object, chosen by name with ``objective`` (:data:`OBJECTIVES`): it checks
that the teacher can serve it, builds the student network and its loss, resets and moves its
state (a centre), and computes one step. The module names no objective; adding one is a class
here and an entry in :data:`OBJECTIVES`.

* ``"features"``: the student's pooled features and feature map, through linear projections,
  regress the teacher's L2-normalised ones
  (:class:`~lightning_dino.losses.distillation.FeatureDistillationLoss`); any teacher.
* ``"dino"``: DINOv2's distillation (Oquab et al., 2023, Sec. 5): the frozen teacher's DINO head
  gives the targets (centred, or Sinkhorn-Knopp) on the global crops, the student has its own
  head and sees every crop; needs a teacher with a DINO head (a ``DINO`` checkpoint).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.distillation import FeatureDistillationLoss
from lightning_dino.networks.backbones import MultiCropNetwork, feature_dim
from lightning_dino.networks.distillation import FeatureStudent, FrozenTeacher, map_channels
from lightning_dino.networks.head import DINOHead
from lightning_dino.setting_names import setting
from lightning_dino.training.step_logging import PrototypeScores, StepResult


class Objective:
    """Base of a distillation objective.

    Attributes:
        name: The value of ``objective`` that selects it.
        has_prototypes: Whether its steps give prototype scores (then the collapse warning is
            brought with the monitors).
    """

    name: ClassVar[str]
    has_prototypes: ClassVar[bool] = False

    def __init__(self, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any]) -> None:
        self.hparams = hparams
        self.run = run

    @classmethod
    def check_teacher(cls, teacher: FrozenTeacher, owner: object) -> None:
        """Raise when the teacher cannot serve the objective; any teacher by default."""

    def build(
        self, backbone: nn.Module, in_dim: int, teacher: FrozenTeacher
    ) -> tuple[nn.Module, nn.Module]:
        """The student network around ``backbone`` (width ``in_dim``) and the loss.

        Returns:
            ``(student, loss)``: the module's ``student`` and ``loss``.
        """
        raise NotImplementedError

    def start_run(self, loss: nn.Module) -> None:
        """A run from step 0: reset the loss's state; nothing by default."""

    def before_optimizer_step(self, loss: nn.Module) -> None:
        """Once per optimizer step, after the gradients are final; nothing by default."""

    def step(self, module: Any, crops: list[Tensor]) -> StepResult:
        """One step's loss.

        Args:
            module: The Distillation module (its ``student``, ``teacher``, ``loss``).
            crops: Crop-major (B, C, H, W) tensors, the global crops first.
        """
        raise NotImplementedError


class FeatureObjective(Objective):
    """Regress the teacher's pooled features and feature map (any teacher; global crops only)."""

    name = "features"

    def build(
        self, backbone: nn.Module, in_dim: int, teacher: FrozenTeacher
    ) -> tuple[nn.Module, nn.Module]:
        """Linear projections to the teacher's widths, and the feature loss."""
        hp = self.hparams
        teacher_dim = feature_dim(teacher.backbone)
        maps = (map_channels(backbone), map_channels(teacher.backbone, hp.teacher_image_size))
        if hp.spatial_loss_weight <= 0 or None in maps:
            maps = (None, None)  # pooled features only
        student = FeatureStudent(backbone, in_dim, teacher_dim, *maps)
        return student, FeatureDistillationLoss(hp.distance, spatial_weight=hp.spatial_loss_weight)

    def step(self, module: Any, crops: list[Tensor]) -> StepResult:
        """The teacher and the student on the global crops (one call each), the feature loss."""
        globals_ = torch.cat(crops[: self.hparams.n_global_crops])
        teacher, teacher_map = module.teacher.features(globals_, self.hparams.teacher_image_size)
        student, student_map = module.student(globals_)
        loss, parts = module.loss(student, teacher, student_map, teacher_map)
        logged = {f"train/{name}_loss": value for name, value in parts.items()}
        return StepResult(loss, crops[0].shape[0], logged)


class DINOObjective(Objective):
    """DINOv2's distillation: the frozen teacher head's targets, the student's own head."""

    name = "dino"
    has_prototypes = True

    def __init__(self, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any]) -> None:
        super().__init__(hparams, teacher, run)
        self.teacher_temp = hparams.teacher_temp or run["teacher_temp"]

    @classmethod
    def check_teacher(cls, teacher: FrozenTeacher, owner: object) -> None:
        """The targets come from the teacher's DINO head: a teacher without one cannot serve."""
        if teacher.head is None:
            raise ValueError(
                f"{setting(owner, 'objective', 'dino')} needs a teacher with a DINO head (a "
                f"checkpoint of lightning_dino.DINO); this teacher has none. Use "
                f"{setting(owner, 'objective', 'features')}."
            )

    def build(
        self, backbone: nn.Module, in_dim: int, teacher: FrozenTeacher
    ) -> tuple[nn.Module, nn.Module]:
        """The student's own DINO head (the teacher head's shape) and the DINO loss."""
        hp = self.hparams
        head = DINOHead(in_dim, **self.run["head"], norm_last_layer=hp.norm_last_layer)
        loss = DINOLoss(
            self.run["head"]["out_dim"], hp.student_temp, center_momentum=hp.center_momentum,
            centering=hp.centering,
        )
        loss.defer_center_update = True  # once per optimizer step
        self.start_run(loss)
        return MultiCropNetwork(backbone, head), loss

    def start_run(self, loss: nn.Module) -> None:
        """The centre restarts from the teacher run's (or 0)."""
        loss.reset_center()
        if self.run["center"] is not None:
            loss.center.copy_(self.run["center"])

    def before_optimizer_step(self, loss: nn.Module) -> None:
        """The DINO centre moves once per optimizer step."""
        loss.update_center()

    def step(self, module: Any, crops: list[Tensor]) -> StepResult:
        """The teacher head's logits on the global crops, the student's on every crop."""
        n_global = self.hparams.n_global_crops
        batch = crops[0].shape[0]
        with torch.no_grad():
            features, _ = module.teacher.features(
                torch.cat(crops[:n_global]), self.hparams.teacher_image_size
            )
            teacher_out = module.teacher.head(features).reshape(n_global, batch, -1)
        student_out = module.student(crops)
        loss = module.loss(student_out, teacher_out, self.teacher_temp)
        scores = PrototypeScores(
            student_out, teacher_out, module.loss.center, self.hparams.student_temp,
            self.teacher_temp,
        )
        return StepResult(loss, batch, {"train/dino_loss": loss}, scores)


OBJECTIVES: dict[str, type[Objective]] = {
    objective.name: objective for objective in (FeatureObjective, DINOObjective)
}
"""The objectives by the name ``objective`` selects."""


def make_objective(
    name: str, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any], owner: object
) -> Objective:
    """The objective ``name`` for this teacher, or an error naming the choices.

    Args:
        name: The ``objective`` argument.
        hparams: The module's hyperparameters.
        teacher: The frozen teacher.
        run: What the teacher's run trained with (its head, temperature and centre; empty for a
            teacher without a head), from :func:`~lightning_dino.io.frozen_teacher.load_teacher`.
        owner: The module, for the names in messages.

    Raises:
        ValueError: For an unknown name, or a teacher the objective cannot use.
    """
    if name not in OBJECTIVES:
        choices = " or ".join(repr(key) for key in OBJECTIVES)
        raise ValueError(f"{setting(owner, 'objective', name)}: use {choices}")
    objective = OBJECTIVES[name]
    objective.check_teacher(teacher, owner)
    return objective(hparams, teacher, run)
