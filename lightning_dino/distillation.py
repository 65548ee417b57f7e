"""The Distillation LightningModule: a student trained against a frozen, pre-trained teacher.

Two objectives. ``"dino"`` is DINOv2's distillation (Oquab et al., 2023, Sec. 5): the frozen
teacher's DINO head gives the targets (centred, or Sinkhorn-Knopp) on the global crops, the
student has its own head and sees every crop, and an EMA of the student is the final model.
``"features"`` is for teachers without a head (any timm or hub checkpoint): the student's
pooled features and feature map, through linear projections, regress the teacher's
L2-normalised ones (:class:`~lightning_dino.losses.distillation.FeatureDistillationLoss`).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.io.teacher import load_teacher
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.distillation import FeatureDistillationLoss
from lightning_dino.naming import setting
from lightning_dino.networks.backbones import MultiCropNetwork, create_timm_backbone, feature_dim
from lightning_dino.networks.distillation import FeatureStudent, map_channels
from lightning_dino.networks.head import DINOHead
from lightning_dino.training.callbacks import callbacks_to_bring
from lightning_dino.training.checkpointing import RandomStateCallback, check_finite_loss
from lightning_dino.training.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.training.optimization import StudentOptimization
from lightning_dino.training.preflight import check_first_batch, check_model_and_data, crops_of
from lightning_dino.training.resume import check_resume
from lightning_dino.training.step_logging import (
    log_losses,
    log_schedules,
    log_training_step,
    writes_logs_this_step,
)
from lightning_dino.training.teacher import TeacherEMA

Batch = tuple[list[Tensor], Tensor] | list[Tensor] | dict[str, Any]
Objective = Literal["features", "dino"]


class Distillation(StudentOptimization, pl.LightningModule):
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
        objective: ``"features"`` (default: it measured best, see ``docs/distillation.md``, and
            works with every teacher) or ``"dino"`` (DINOv2's; needs a teacher with a DINO
            head, i.e. a ``DINO`` checkpoint).
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
        ema_momentum: Momentum of the student's EMA at step 0; cosine to ``ema_momentum_end``
            (0 and 0: the EMA is a copy of the student).
        ema_momentum_end: Momentum of the EMA at the last step.
        lr: Base learning rate for a global batch of 256 (see :class:`~lightning_dino.DINO`).
        min_lr: Final learning rate of the cosine decay.
        warmup_epochs: Epochs of linear learning-rate warmup.
        weight_decay: Weight decay at step 0.
        weight_decay_end: Weight decay at the last step.
        clip_grad: Per-tensor gradient-norm clip; 0 disables.
        layerwise_decay: Layer-wise learning-rate decay of a ViT student (1.0 = off).
        patch_embed_lr_mult: Extra learning-rate factor of the patch embedding.
        optimizer: ``"adamw"`` or ``"sgd"``.
        channels_last: Keep a convolutional student's weights channels-last.
        backbone_dim: Feature width of an ``nn.Module`` student that cannot be probed.
        monitors: Bring the throughput log and crop grid (and, for ``"dino"``, the collapse
            warning).
    """

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
        ema_momentum: float = 0.996,
        ema_momentum_end: float = 1.0,
        lr: float = 0.0005,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        layerwise_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        channels_last: bool = True,
        backbone_dim: int | None = None,
        monitors: bool = True,
    ) -> None:
        super().__init__()
        modules = [name for name, v in (("teacher", teacher), ("backbone", backbone))
                   if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=modules or None)
        if isinstance(teacher, Path):
            teacher = str(teacher)
        self.teacher, teacher_run = load_teacher(teacher, teacher_kwargs)
        self.objective = self._resolve_objective(objective)
        student_backbone = self._student_backbone(backbone, backbone_kwargs, feature_grid)
        in_dim = backbone_dim or feature_dim(student_backbone)
        if self.objective == "dino":
            self._build_dino(student_backbone, in_dim, teacher_run)
        else:
            self._build_features(student_backbone, in_dim)
        if channels_last and not hasattr(student_backbone, "patch_embed"):
            self.student.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self._brought_callbacks: list[Callback] = []
        self._check_next_batch = True
        self.crop_sizes: dict[str, list[int] | None] | None = None
        self.peak_lr = lr

    def _resolve_objective(self, objective: Objective) -> Literal["features", "dino"]:
        has_head = self.teacher.head is not None
        if objective == "dino" and not has_head:
            raise ValueError(
                f"{setting('model', 'objective', 'dino')} needs a teacher with a DINO head (a "
                f"checkpoint of lightning_dino.DINO); this teacher has none. Use "
                f"{setting('model', 'objective', 'features')}."
            )
        if objective not in ("features", "dino"):
            raise ValueError(
                f"{setting('model', 'objective', objective)}: use 'features' or 'dino'"
            )
        return objective

    def _student_backbone(
        self, backbone: str | nn.Module, kwargs: dict[str, Any] | None, grid: int
    ) -> nn.Module:
        if isinstance(backbone, str):
            return create_timm_backbone(backbone, self.hparams.drop_path_rate, kwargs, grid)
        if grid:
            raise ValueError(
                f"{setting('model', 'feature_grid')} applies to a timm student given by name; "
                f"pool inside your module and pass {setting('model', 'feature_grid', 0)}"
            )
        return backbone

    def _build_dino(self, backbone: nn.Module, in_dim: int, run: dict[str, Any]) -> None:
        """The student's own DINO head (the teacher head's shape) and the DINO loss."""
        hp = self.hparams
        head = DINOHead(in_dim, **run["head"], norm_last_layer=hp.norm_last_layer)
        self.student = MultiCropNetwork(backbone, head)
        self.loss = DINOLoss(
            run["head"]["out_dim"], hp.student_temp, center_momentum=hp.center_momentum,
            centering=hp.centering,
        )
        self.loss.defer_center_update = True  # once per optimizer step
        self._teacher_center = run["center"]
        if self._teacher_center is not None:
            self.loss.center.copy_(self._teacher_center)
        self.teacher_temperature = hp.teacher_temp or run["teacher_temp"]

    def _build_features(self, backbone: nn.Module, in_dim: int) -> None:
        """Linear projections to the teacher's widths and the feature loss."""
        hp = self.hparams
        teacher_dim = feature_dim(self.teacher.backbone)
        maps = (map_channels(backbone), map_channels(self.teacher.backbone, hp.teacher_image_size))
        if hp.spatial_loss_weight <= 0 or None in maps:
            maps = (None, None)  # pooled features only
        self.student = FeatureStudent(backbone, in_dim, teacher_dim, *maps)
        self.loss = FeatureDistillationLoss(hp.distance, spatial_weight=hp.spatial_loss_weight)

    # Lightning hooks ------------------------------------------------------------------------

    def configure_callbacks(self) -> list[Callback]:
        """The student EMA and the random-state checkpointing (exact resume), plus monitors."""
        if self._trainer is not None:
            check_model_and_data(self, self.trainer)
        hp = self.hparams
        ema = TeacherEMA(hp.ema_momentum, hp.ema_momentum_end, target="ema", copy_buffers=True)
        monitors = [ThroughputLogger, CropGridLogger] if hp.monitors else []
        if hp.monitors and self.objective == "dino":
            monitors.insert(0, CollapseMonitor)
        callbacks, self._brought_callbacks = callbacks_to_bring(
            self._trainer, [ema, RandomStateCallback()], monitors, self._brought_callbacks
        )
        return callbacks

    def forward(self, images: Tensor) -> Tensor:
        """Features of the student's EMA backbone, the model this module trains and exports.

        Args:
            images: Shape (B, C, H, W).

        Returns:
            Features of shape (B, D).
        """
        return self.ema.backbone(images)

    @property
    def evaluated_backbone(self) -> nn.Module:
        """The student's EMA backbone: what monitors evaluate (never the frozen teacher)."""
        return self.ema.backbone

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

    def on_train_start(self) -> None:
        """Fix the run length and peak lr; a run from step 0 restarts the centre."""
        self._check_next_batch = True
        if self.trainer.global_step == 0 and self.objective == "dino":
            self.loss.reset_center()
            if self._teacher_center is not None:
                self.loss.center.copy_(self._teacher_center)
        self.start_schedules()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the crop sizes the run trained on (``export`` reads them)."""
        if self.crop_sizes is not None:
            checkpoint["crop_sizes"] = self.crop_sizes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a checkpoint against this module before Lightning loads it (see DINO)."""
        check_resume(self, checkpoint)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-tensor clip of unscaled gradients; the DINO centre moves once per step."""
        self.clip_student_gradients(optimizer)
        if self.objective == "dino":
            self.loss.update_center()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """One step: the teacher on the global crops (one call), the student, the loss."""
        crops = crops_of(batch)
        if self._check_next_batch:
            self.crop_sizes = check_first_batch(self, crops)
            self._check_next_batch = False
        n_global = self.hparams.n_global_crops
        globals_ = torch.cat(crops[:n_global])
        teacher, teacher_map = self.teacher.features(globals_, self.hparams.teacher_image_size)
        if self.objective == "dino":
            return self._dino_step(crops, teacher, n_global)
        student, student_map = self.student(globals_)
        loss, terms = self.loss(student, teacher, student_map, teacher_map)
        check_finite_loss(self, loss)
        batch_size = crops[0].shape[0]
        logged = {f"train/{name}_loss": value for name, value in terms.items()}
        log_losses(self, loss, logged, batch_size)
        if writes_logs_this_step(self.trainer):
            log_schedules(self, {}, batch_size)
        return {"loss": loss}

    def _dino_step(self, crops: list[Tensor], teacher: Tensor, n_global: int) -> dict[str, Any]:
        """DINO loss between the frozen teacher head's targets and the student's logits."""
        with torch.no_grad():
            teacher_out = self.teacher.head(teacher).reshape(n_global, crops[0].shape[0], -1)
        student_out = self.student(crops)
        temp = self.teacher_temperature
        loss = self.loss(student_out, teacher_out, temp)
        check_finite_loss(self, loss)
        return log_training_step(
            self, loss, {"train/dino_loss": loss}, student_out, teacher_out, self.loss.center,
            self.hparams.student_temp, temp,
        )
