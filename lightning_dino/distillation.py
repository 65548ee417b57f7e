"""The Distillation method: a student trained against a frozen, pre-trained teacher.

The objective (:mod:`~lightning_dino.distillation_objectives`) says what the student learns:
``"features"`` regresses the teacher's features (any teacher), ``"dino"`` is DINOv2's
distillation with the teacher's DINO head. An EMA of the student is the final model. The
lifecycle around the step is the method base's (:class:`~lightning_dino.training.method.Method`).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_dino.distillation_objectives import make_objective
from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.io.frozen_teacher import load_teacher
from lightning_dino.io.start_weights import pretrained_weights, split_pretrained
from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.networks.backbones import create_timm_backbone, feature_dim
from lightning_dino.networks.checkpointing import use_activation_checkpointing
from lightning_dino.networks.sharding import load_full_state_
from lightning_dino.setting_names import setting
from lightning_dino.training.ema import TeacherEMA
from lightning_dino.training.method import Check, Method
from lightning_dino.training.step_logging import StepResult

Objective = Literal["features", "dino"]


class Distillation(Method):
    """Distil a frozen teacher into a student backbone; an EMA of the student is the result.

    Training batches are those of :class:`~lightning_dino.DINO` (``[g1, g2, l1..lN]`` crops,
    globals first). The teacher sees the global crops only, in one call; with ``"dino"`` the
    student sees every crop, with ``"features"`` the global crops (the same views as the
    teacher, so that feature maps align; local crops are not used: set
    ``n_local_crops: 0`` in the data).

    Args:
        teacher: A DINO checkpoint (``.ckpt``: its EMA teacher with its head; a distillation
            checkpoint gives its student EMA), an export directory of ``lightning-dino export``,
            a timm model name (built with ``teacher_kwargs``) or an ``nn.Module`` returning
            (B, D) features.
        backbone: The student: a timm model name or an ``nn.Module`` returning (B, D).
        backbone_kwargs: Extra ``timm.create_model`` arguments of the student.
        teacher_kwargs: ``timm.create_model`` arguments of a teacher given by timm name, e.g.
            ``{pretrained: true, pretrained_cfg_overlay: {file: /path/model.safetensors}}``.
        objective: What the student learns (:mod:`~lightning_dino.distillation_objectives`):
            ``"features"`` (default: it measured best, see ``docs/distillation.md``, and works
            with every teacher) or ``"dino"`` (DINOv2's; needs a teacher with a DINO head, i.e.
            a ``DINO`` checkpoint).
        feature_grid: Grid pooling of a timm student (see :class:`~lightning_dino.DINO`).
        drop_path_rate: Stochastic depth of the student (DINOv2 distils without).
        teacher_image_size: Resize the global crops to this size for the teacher (a teacher
            that works at a higher resolution than the student); None feeds them as they are.
        distance: ``"features"``: ``"cosine"`` (1 - cos) or ``"mse"`` (of normalised vectors).
        spatial_loss_weight: ``"features"``: weight of the feature-map term (0: pooled only);
            the pooled term has weight 1.
        n_global_crops: How many leading crops are global (teacher) views.
        student_temp: ``"dino"``: student temperature.
        teacher_temp: ``"dino"``: teacher temperature; None: the teacher checkpoint's.
        centering: ``"dino"``: ``"center"`` (an EMA centre, starting from the teacher
            checkpoint's) or ``"sinkhorn_knopp"``.
        center_momentum: ``"dino"``: EMA momentum of the centre.
        norm_last_layer: ``"dino"``: freeze the weight-norm magnitude of the student head's
            last layer.
        ibot_loss_weight: ``"dino"``: weight of DINOv3's iBOT targets (0 = off): the teacher's
            iBOT head on its patch tokens at random positions of the global crops, which the
            student (a ViT with the teacher's patch grid) predicts from the whole crops; the
            teacher must have trained with iBOT.
        koleo_loss_weight: ``"dino"``: weight of KoLeo on the student's global-crop features.
        ibot_mask_ratio: ``"dino"`` with iBOT: see :class:`~lightning_dino.losses.ibot.iBOTTerm`.
        ibot_mask_probability: See ``iBOTTerm``.
        ibot_mask_rule: See ``iBOTTerm``.
        ema_momentum: Momentum of the student's EMA at step 0; cosine to ``ema_momentum_end``
            (0 and 0: the EMA is a copy of the student).
        ema_momentum_end: Momentum of the EMA at the last step.
        lr: Base learning rate for a global batch of 256 (see :class:`~lightning_dino.DINO`).
        min_lr: Final learning rate of the cosine decay.
        warmup_epochs: Epochs of linear learning-rate warmup.
        weight_decay: Weight decay at step 0.
        weight_decay_end: Weight decay at the last step.
        clip_grad: Gradient-norm clip; 0 disables.
        clip_mode: ``"per_tensor"`` or ``"per_module"`` (see :class:`~lightning_dino.DINO`).
        adamw_betas: AdamW's betas.
        lr_scaling: ``"linear_wrt_256"`` or ``"sqrt_wrt_1024"`` (see ``DINO``).
        layerwise_decay: Layer-wise learning-rate decay of a ViT student (1.0 = off).
        patch_embed_lr_mult: Extra learning-rate factor of the patch embedding.
        optimizer: ``"adamw"`` or ``"sgd"``.
        channels_last: Keep a convolutional student's weights channels-last.
        activation_checkpointing: Recompute the student's activations block by block in
            backward (see :class:`~lightning_dino.DINO`).
        backbone_dim: Feature width of an ``nn.Module`` student that cannot be probed.
        monitors: Bring the throughput log and crop grid (and, for ``"dino"``, the collapse
            warning).

    Examples:
        >>> # a released teacher: teacher_kwargs={"pretrained": True,
        >>> #     "pretrained_cfg_overlay": {"file": "teacher.safetensors"}}
        >>> model = Distillation(teacher="resnet50", backbone="resnet18")
        >>> any(parameter.requires_grad for parameter in model.teacher.parameters())
        False
        >>> data = MultiCropDataModule(dataset="folder", data_dir="photos/", n_local_crops=0)
        >>> pl.Trainer(max_epochs=50).fit(model, data)  # doctest: +SKIP
    """

    evaluated_network = "ema"
    frozen_networks = ("teacher",)
    structural_keys = ("objective", "norm_last_layer")

    def __init__(
        self,
        teacher: str | nn.Module,
        backbone: str | nn.Module = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        objective: Objective = "features",
        feature_grid: int = 0,
        drop_path_rate: float = 0.0,
        teacher_image_size: int | None = None,
        distance: Literal["cosine", "mse"] = "cosine",
        spatial_loss_weight: float = 1.0,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float | None = None,
        centering: Literal["center", "sinkhorn_knopp"] = "center",
        center_momentum: float = 0.9,
        norm_last_layer: bool = True,
        ibot_loss_weight: float = 0.0,
        koleo_loss_weight: float = 0.0,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
        ibot_mask_rule: Literal["dinov2", "dinov3"] = "dinov2",
        ema_momentum: float = 0.996,
        ema_momentum_end: float = 1.0,
        lr: float = 0.0005,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        clip_mode: Literal["per_tensor", "per_module"] = "per_tensor",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        lr_scaling: Literal["linear_wrt_256", "sqrt_wrt_1024"] = "linear_wrt_256",
        layerwise_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        channels_last: bool = True,
        activation_checkpointing: bool = False,
        backbone_dim: int | None = None,
        monitors: bool = True,
    ) -> None:
        super().__init__()
        self.save_arguments()
        self.validate_arguments()
        if isinstance(teacher, Path):
            teacher = str(teacher)
        self.teacher, run = load_teacher(
            teacher, teacher_kwargs, owner=self, patch_head=ibot_loss_weight > 0
        )
        self._pending_teacher = run.pop("pending_teacher", None)
        self.objective = make_objective(objective, self.hparams, self.teacher, run, owner=self)
        build_kwargs, pretrained = split_pretrained(backbone_kwargs)
        student_backbone = self._student_backbone(backbone, build_kwargs, feature_grid)
        if activation_checkpointing:
            use_activation_checkpointing(student_backbone, self)
        in_dim = backbone_dim or feature_dim(student_backbone, self)
        self.student, self.loss, terms = self.objective.build(
            student_backbone, in_dim, self.teacher
        )
        for term in terms:
            self.add_module(term.name, term)  # checkpoint keys <name>.*
        if channels_last and not hasattr(student_backbone, "patch_embed"):
            self.student.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self.prepare_start(None, pretrained, backbone, feature_grid)

    def _student_backbone(
        self, backbone: str | nn.Module, kwargs: dict[str, Any] | None, grid: int
    ) -> nn.Module:
        if isinstance(backbone, str):
            return create_timm_backbone(backbone, self.hparams.drop_path_rate, kwargs, grid, self)
        if grid:
            raise ValueError(
                f"{setting(self, 'feature_grid')} applies to a timm student given by name; "
                f"pool inside your module and pass {setting(self, 'feature_grid', 0)}"
            )
        return backbone

    def argument_checks(self) -> list[Check]:
        """The method base's checks and Distillation's own."""
        hp = self.hparams
        return [
            *super().argument_checks(),
            (hp.student_temp > 0, "student_temp", "use a positive temperature (0.1)"),
            (hp.teacher_temp is None or hp.teacher_temp > 0, "teacher_temp",
             "use a positive temperature, or null for the teacher run's"),
            (0 <= hp.center_momentum <= 1, "center_momentum", "use a value in [0, 1] (0.9)"),
            (hp.centering in ("center", "sinkhorn_knopp"), "centering",
             "use center or sinkhorn_knopp"),
            (0 <= hp.ema_momentum <= 1, "ema_momentum", "use a value in [0, 1] (0.996)"),
            (0 <= hp.ema_momentum_end <= 1, "ema_momentum_end", "use a value in [0, 1]"),
            (hp.distance in ("cosine", "mse"), "distance", "use cosine or mse"),
            (hp.spatial_loss_weight >= 0, "spatial_loss_weight", "use 0 (pooled only) or more"),
            (hp.teacher_image_size is None or hp.teacher_image_size > 0, "teacher_image_size",
             "use a positive side, or null for the crops as they are"),
            (hp.ibot_loss_weight >= 0, "ibot_loss_weight", "use 0 (off) or a weight (1.0)"),
            (hp.koleo_loss_weight >= 0, "koleo_loss_weight", "use 0 (off) or a weight (0.1)"),
            *iBOTTerm.mask_checks(hp),
        ]

    def method_callbacks(self) -> list[Callback]:
        """The EMA of the student, the model the run trains (its BatchNorm statistics copied)."""
        hp = self.hparams
        return [TeacherEMA(hp.ema_momentum, hp.ema_momentum_end, target="ema", copy_buffers=True)]

    def monitor_types(self) -> list[type[Callback]]:
        """The base's monitors, after the collapse warning when the objective has prototypes."""
        collapse = [CollapseMonitor] if self.objective.has_prototypes else []
        return [*collapse, *super().monitor_types()]

    def on_fit_start(self) -> None:
        """Silence Lightning's eval-mode warning when only the frozen teacher is in eval mode.

        Lightning warns "Found N module(s) in eval mode" at the start of training; the frozen
        teacher is in eval mode on purpose. The filter matches that exact N, so a module of the
        student left in eval mode by mistake still raises the warning.
        """
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name.split(".")[0] == "teacher" for name in in_eval):
            warnings.filterwarnings(
                "ignore", message=f"Found {len(in_eval)} module\\(s\\) in eval mode"
            )

    def start_run(self) -> None:
        """A run from step 0: the teacher's waiting weights, the objective's state (a centre)."""
        if self._pending_teacher is not None:
            load_full_state_(self.teacher.backbone, pretrained_weights(
                self.hparams.teacher, self._pending_teacher, 0, self, "teacher_kwargs"
            ))
            self._pending_teacher = None
        self.objective.start_run(self.loss)

    def before_optimizer_step(self) -> None:
        """The objective's once-per-step updates (the DINO centre)."""
        self.objective.before_optimizer_step(self.loss)

    def compute_step(self, crops: list[Tensor], extra_crops: dict[str, list[Tensor]]) -> StepResult:
        """The objective's step: the teacher on the global crops in one call, the student."""
        return self.objective.step(self, crops)
