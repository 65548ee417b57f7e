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
  head and sees every crop; needs a teacher with a DINO head (a ``DINO`` checkpoint). As in
  DINOv3's distillation (``dinov3/train/ssl_meta_arch.py``), it may add iBOT targets, the
  teacher's iBOT head on its patch tokens at randomly chosen positions of the global crops,
  which the student predicts at the same positions from the whole crops (the student's input
  is not masked), and KoLeo on the student's global-crop features.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.distillation import FeatureDistillationLoss
from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.losses.koleo import KoLeoTerm
from lightning_dino.losses.term import LossTerm, add_term_losses
from lightning_dino.networks.backbones import MultiCropNetwork, feature_dim
from lightning_dino.networks.distillation import FeatureStudent, FrozenTeacher, map_channels
from lightning_dino.networks.forward import StepOutputs
from lightning_dino.networks.head import DINOHead
from lightning_dino.networks.tokens import check_token_backbone
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

    def __init__(
        self, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any], owner: object = "model"
    ) -> None:
        self.hparams = hparams
        self.run = run
        self.owner = owner

    @classmethod
    def check_teacher(
        cls, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any], owner: object
    ) -> None:
        """Raise when the teacher (and what its run trained with) cannot serve the objective.

        Here: the extra terms (``ibot_loss_weight``, ``koleo_loss_weight``) are the ``dino``
        objective's; any teacher otherwise.
        """
        for key in ("ibot_loss_weight", "koleo_loss_weight"):
            weight = hparams.get(key, 0)
            if weight and cls.name != "dino":
                raise ValueError(
                    f"{setting(owner, key, weight)} applies to "
                    f"{setting(owner, 'objective', 'dino')}; use {setting(owner, key, 0)}"
                )

    def build(
        self, backbone: nn.Module, in_dim: int, teacher: FrozenTeacher
    ) -> tuple[nn.Module, nn.Module, list[LossTerm]]:
        """The student network around ``backbone`` (width ``in_dim``), the loss, extra terms.

        Returns:
            ``(student, loss, terms)``: the module's ``student``, ``loss`` and the loss terms
            it adds (child modules named after them).
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
    ) -> tuple[nn.Module, nn.Module, list[LossTerm]]:
        """Linear projections to the teacher's widths, and the feature loss."""
        hp = self.hparams
        teacher_dim = feature_dim(teacher.backbone)
        maps = (map_channels(backbone), map_channels(teacher.backbone, hp.teacher_image_size))
        if hp.spatial_loss_weight <= 0 or None in maps:
            maps = (None, None)  # pooled features only
        student = FeatureStudent(backbone, in_dim, teacher_dim, *maps)
        loss = FeatureDistillationLoss(hp.distance, spatial_weight=hp.spatial_loss_weight)
        return student, loss, []

    def step(self, module: Any, crops: list[Tensor]) -> StepResult:
        """The teacher and the student on the global crops (one call each), the feature loss."""
        globals_ = torch.cat(crops[: self.hparams.n_global_crops])
        teacher, teacher_map = module.teacher.features(globals_, self.hparams.teacher_image_size)
        student, student_map = module.student(globals_)
        loss, parts = module.loss(student, teacher, student_map, teacher_map)
        logged = {f"train/{name}_loss": value for name, value in parts.items()}
        return StepResult(loss, crops[0].shape[0], logged)


class DINOObjective(Objective):
    """DINOv2's distillation: the frozen teacher head's targets, the student's own head.

    With ``ibot_loss_weight`` > 0 also DINOv3's iBOT targets (the teacher must have trained with
    iBOT; its separate iBOT head, or its DINO head when it shared it), and with
    ``koleo_loss_weight`` > 0 KoLeo on the student's global-crop features.
    """

    name = "dino"
    has_prototypes = True

    def __init__(
        self, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any], owner: object = "model"
    ) -> None:
        super().__init__(hparams, teacher, run, owner)
        self.teacher_temp = hparams.teacher_temp or run["teacher_temp"]
        self.terms: list[LossTerm] = []

    @classmethod
    def check_teacher(
        cls, hparams: Any, teacher: FrozenTeacher, run: dict[str, Any], owner: object
    ) -> None:
        """A DINO head for the targets; for iBOT, a teacher that trained with it, and tokens."""
        if teacher.head is None:
            raise ValueError(
                f"{setting(owner, 'objective', 'dino')} needs a teacher with a DINO head (a "
                f"checkpoint of lightning_dino.DINO); this teacher has none. Use "
                f"{setting(owner, 'objective', 'features')}."
            )
        weight = hparams.get("ibot_loss_weight", 0)
        if not weight:
            return
        if not run.get("ibot"):
            raise ValueError(
                f"{setting(owner, 'ibot_loss_weight', weight)} needs a teacher that trained with "
                f"iBOT (its checkpoint's ibot_loss_weight > 0); this one did not. Use "
                f"{setting(owner, 'ibot_loss_weight', 0)}."
            )
        check_token_backbone(teacher.backbone, owner, "ibot_loss_weight")

    def build(
        self, backbone: nn.Module, in_dim: int, teacher: FrozenTeacher
    ) -> tuple[nn.Module, nn.Module, list[LossTerm]]:
        """The student's own heads (the teacher heads' shapes), the DINO loss, iBOT and KoLeo."""
        hp = self.hparams
        head = DINOHead(in_dim, **self.run["head"], norm_last_layer=hp.norm_last_layer)
        loss = DINOLoss(
            self.run["head"]["out_dim"], hp.student_temp, center_momentum=hp.center_momentum,
            centering=hp.centering,
        )
        loss.defer_center_update = True  # once per optimizer step
        patch_head = None
        if hp.get("ibot_loss_weight", 0):
            check_token_backbone(backbone, self.owner, "ibot_loss_weight")
            self._check_patch_grid(backbone, teacher)
            patch_kwargs = self.run.get("patch_head")
            if patch_kwargs is not None:
                patch_head = DINOHead(in_dim, **patch_kwargs, norm_last_layer=hp.norm_last_layer)
            out_dim = (patch_kwargs or self.run["head"])["out_dim"]
            self.terms.append(iBOTTerm(
                hp.ibot_loss_weight, out_dim, hp.student_temp, hp.center_momentum, hp.centering,
                tuple(hp.ibot_mask_ratio), hp.ibot_mask_probability, hp.ibot_mask_rule,
            ))
        if hp.get("koleo_loss_weight", 0):
            self.terms.append(KoLeoTerm(hp.koleo_loss_weight))
        self.start_run(loss)
        return MultiCropNetwork(backbone, head, patch_head=patch_head), loss, self.terms

    def _check_patch_grid(self, backbone: nn.Module, teacher: FrozenTeacher) -> None:
        """The student's patches must be the teacher's, at the same size, for iBOT targets."""
        student, master = backbone.patch_embed.patch_size, teacher.backbone.patch_embed.patch_size
        size = self.hparams.teacher_image_size
        if tuple(student) != tuple(master) or size is not None:
            raise ValueError(
                f"{setting(self.owner, 'ibot_loss_weight', self.hparams.ibot_loss_weight)} needs "
                f"the student's patch grid to be the teacher's: patches of {tuple(student)} and "
                f"{tuple(master)} pixels, {setting(self.owner, 'teacher_image_size', size)}; use "
                "a student with the teacher's patch size and leave teacher_image_size unset"
            )

    def start_run(self, loss: nn.Module) -> None:
        """The centres restart from the teacher run's (or 0)."""
        loss.reset_center()
        if self.run["center"] is not None:
            loss.center.copy_(self.run["center"])
        for term in self.terms:
            term.start_run()
            if isinstance(term, iBOTTerm) and self.run.get("ibot_center") is not None:
                term.loss.center.copy_(self.run["ibot_center"])

    def before_optimizer_step(self, loss: nn.Module) -> None:
        """The centres move once per optimizer step."""
        loss.update_center()
        for term in self.terms:
            term.before_optimizer_step()

    def step(self, module: Any, crops: list[Tensor]) -> StepResult:
        """The teacher heads' logits on the global crops, the student's on every crop."""
        n_global = self.hparams.n_global_crops
        batch = crops[0].shape[0]
        images = torch.cat(crops[:n_global])
        with torch.no_grad():
            features, fmap = module.teacher.features(images, self.hparams.teacher_image_size)
            teacher_out = module.teacher.head(features).reshape(n_global, batch, -1)
        outputs = self._student_outputs(module, crops, teacher_out, fmap)
        loss = module.loss(outputs.student_out, teacher_out, self.teacher_temp)
        total, logged = add_term_losses(loss, self.terms, outputs, self.teacher_temp,
                                        module.global_step)
        scores = PrototypeScores(
            outputs.student_out, teacher_out, module.loss.center, self.hparams.student_temp,
            self.teacher_temp,
        )
        return StepResult(total, batch, {"train/dino_loss": loss, **logged}, scores)

    def _student_outputs(
        self, module: Any, crops: list[Tensor], teacher_out: Tensor, fmap: Tensor | None
    ) -> StepOutputs:
        """The student's outputs, with iBOT's patch logits of both networks when it is on."""
        n_global = self.hparams.n_global_crops
        ibot = next((term for term in self.terms if isinstance(term, iBOTTerm)), None)
        if ibot is None:
            if self.terms:  # KoLeo reads the student's features
                student_out, features = module.student.forward_with_features(crops)
                return StepOutputs(crops, n_global, student_out, teacher_out, features=features)
            return StepOutputs(crops, n_global, module.student(crops), teacher_out)
        rows, columns = module.student.backbone.patch_embed.dynamic_feat_size(crops[0].shape[-2:])
        if fmap is None or tuple(fmap.shape[-2:]) != (rows, columns):
            grid = None if fmap is None else tuple(fmap.shape[-2:])
            raise ValueError(
                f"iBOT distillation needs the teacher's patch grid {grid} to be the student's "
                f"{(rows, columns)}: use backbones with the same patch size and leave "
                "teacher_image_size unset"
            )
        masks = ibot.draw_masks(len(fmap), rows, columns).to(fmap.device)
        with torch.no_grad():
            patches = fmap.flatten(2).transpose(1, 2)[masks]  # (M, D)
            teacher_head = getattr(module.teacher, "patch_head", module.teacher.head)
            teacher_patch_logits = teacher_head(patches)
        student_out, patch_logits, features, patch_tokens = module.student.forward_masked(
            crops, n_global, masks, mask_input=False
        )
        return StepOutputs(
            crops, n_global, student_out, teacher_out, features=features, masks=masks,
            student_patch_logits=patch_logits, teacher_patch_logits=teacher_patch_logits,
            patch_tokens=patch_tokens,
        )


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
    objective.check_teacher(hparams, teacher, run, owner)
    return objective(hparams, teacher, run, owner)
