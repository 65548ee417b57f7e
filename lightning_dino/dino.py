"""The DINO LightningModule: student, momentum teacher, the DINO loss and its optional terms.

Reference: Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021
(``main_dino.py`` of facebookresearch/dino); the optional terms are DINOv2's (iBOT, KoLeo) and
DINOv3's (Gram anchoring). One step: the teacher's targets for the global crops, the student's
outputs for every crop (:func:`~lightning_dino.networks.forward.forward_step`), the DINO loss
plus the weighted sum of the active :class:`~lightning_dino.losses.term.LossTerm`, logging.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.gram import GramTerm
from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.losses.koleo import KoLeoTerm
from lightning_dino.losses.term import LossTerm
from lightning_dino.networks.backbones import build_student_teacher
from lightning_dino.networks.forward import MASKS, forward_step
from lightning_dino.training.callbacks import callbacks_to_bring
from lightning_dino.training.checkpointing import RandomStateCallback, check_finite_loss
from lightning_dino.training.hyperparameters import validate_hyperparameters
from lightning_dino.training.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.training.optimization import StudentOptimization, drop_gradients
from lightning_dino.training.preflight import (
    check_first_batch,
    check_model_and_data,
    crops_of,
)
from lightning_dino.training.resume import check_resume
from lightning_dino.training.schedules import teacher_temperature
from lightning_dino.training.step_logging import log_training_step
from lightning_dino.training.teacher import TeacherEMA

# (crops, labels), a bare list of crops, or {"crops": crops, ...}; see preflight.crops_of.
Batch = tuple[list[Tensor], Tensor] | list[Tensor] | dict[str, Any]


# The optional loss terms of the method, in the order they are summed: adding a term means
# writing its class beside its loss and adding it here (and its weight to DINO's arguments).
TERMS: tuple[type[LossTerm], ...] = (KoLeoTerm, iBOTTerm, GramTerm)


class DINO(StudentOptimization, pl.LightningModule):
    """DINO self-distillation with a momentum teacher (Caron et al., ICCV 2021).

    Defaults are the reference's command-line defaults (``main_dino.py``); the paper's boosted
    recipe (teacher temperature 0.04 -> 0.07 over 30 epochs, ``norm_last_layer=False``) is a config.

    Training batches are ``(crops, labels)`` (labels ignored) or a bare list of crops: crop-major
    tensors ``[g1, g2, l1..lN]`` of shape (B, C, H, W). The teacher sees the first
    ``n_global_crops`` crops under no_grad; the student sees all of them, one backbone call per
    resolution and one head call.

    Args:
        backbone: A timm model name (any timm model; ViTs get dynamic image size) or an
            ``nn.Module`` returning (B, D) features.
        backbone_kwargs: Extra ``timm.create_model`` arguments (``img_size``, ``patch_size``...).
        feature_grid: 0 keeps the backbone's pooling; g > 0 average-pools a CNN's last feature
            map to a g x g grid and flattens it, or appends a ViT's patch tokens averaged to a
            g x g grid to its class token (features keep the layout; for small, centred images
            such as Fashion-MNIST).
        drop_path_rate: Stochastic depth of the student backbone (the teacher has none).
        out_dim: Number of prototypes K of the head.
        hidden_dim: Hidden width of the head's MLP.
        bottleneck_dim: Dimension of the head's L2-normalised bottleneck.
        n_head_layers: Number of Linear layers of the head's MLP.
        use_bn_in_head: BatchNorm in the head's MLP.
        norm_last_layer: Freeze the weight-norm magnitude of the student's last layer at 1.
        n_global_crops: How many leading crops are global (teacher) views.
        student_temp: Student temperature.
        teacher_temp: Teacher temperature after the warmup.
        warmup_teacher_temp: Teacher temperature at epoch 0.
        warmup_teacher_temp_epochs: Epochs of linear teacher-temperature warmup.
        teacher_temp_per_step: Warm the teacher temperature up per optimizer step (DINOv2)
            instead of per epoch (DINO; the temperature of an epoch is constant).
        centering: How the teacher's targets are centred: ``"center"`` (DINO's EMA centre) or
            ``"sinkhorn_knopp"`` (DINOv2's option, 3 iterations over the global batch).
        koleo_loss_weight: Weight of DINOv2's KoLeo regulariser on the student's backbone
            features of each global crop (0 = off; 0.1 in DINOv2).
        ibot_loss_weight: Weight of DINOv2's iBOT masked-patch loss (0 = off; 1.0 in DINOv2).
            Needs a timm ViT whose features are its tokens (``feature_grid`` 0). The student's
            global crops are masked block-wise; one head serves class and patch tokens; the
            patch targets have their own centre (or Sinkhorn-Knopp, with ``centering``).
        gram_loss_weight: Weight of DINOv3's Gram anchoring (0 = off): the MSE between the
            patch similarity matrices of the student's global crops and of a Gram teacher, a
            frozen snapshot of the EMA teacher's backbone (ViTs only).
        gram_start_step: Optimizer step at which the Gram teacher is taken and the loss starts
            (DINOv3 starts late in a long run).
        gram_update_every: Steps between refreshes of the Gram teacher after the start; 0 keeps
            the first snapshot.
        gram_max_updates: At most this many refreshes after the first snapshot (DINOv3's
            ``max_updates``); 0 = no limit.
        gram_remove_negatives: Zero negative patch similarities before comparing (DINOv3's
            ``GramLoss`` class default); False anchors them too, as DINOv3's training configs.
        gram_image_size: Side the global crops are resized to (bicubic) for the Gram teacher,
            whose patch features are then resized to the student's grid (DINOv3 gives the
            Gram teacher higher-resolution crops); 0 = the student's crops as they are.
        ibot_mask_ratio: (min, max) fraction of the patches masked in a masked image.
        ibot_mask_probability: Fraction of the global crops that are masked.
        ibot_separate_head: A separate head for the iBOT patch tokens (DINOv2's ViT-L/g
            recipes); False shares the DINO head.
        ibot_out_dim: Prototypes of the separate iBOT head; 0 = ``out_dim``.
        ibot_bottleneck_dim: Bottleneck of the separate iBOT head; 0 = ``bottleneck_dim``.
        layerwise_decay: DINOv2's layer-wise learning-rate decay for ViT backbones (0.9 in
            DINOv2; 1.0 = off, the DINO reference): block i trains at
            ``decay ** (n_blocks - i)`` times the lr, the embeddings at ``decay ** (n_blocks + 1)``.
        patch_embed_lr_mult: Extra learning-rate factor of the patch embedding (0.2 in DINOv2).
        center_momentum: EMA momentum of the loss centre; 1.0 keeps the centre at 0 (no
            centring, for ablations).
        momentum_teacher: Teacher EMA momentum at step 0; cosine to ``momentum_teacher_end``.
        momentum_teacher_end: Teacher EMA momentum at the last step (1.0; set it and
            ``momentum_teacher`` to 0 for a teacher that is a copy of the student).
        lr: Base learning rate for a global batch of 256; the peak is
            ``lr * per_device_batch * devices * accumulate_grad_batches / 256``.
        min_lr: Final learning rate of the cosine decay.
        warmup_epochs: Epochs of linear learning-rate warmup, applied per step (may be
            fractional for short runs).
        weight_decay: Weight decay at step 0 (decay group only).
        weight_decay_end: Weight decay at the last step (cosine, per step).
        clip_grad: Per-tensor gradient-norm clip after unscaling; 0 disables.
        freeze_last_layer: Epochs during which the head's last-layer gradients are dropped (set to
            None, so AdamW applies neither the update nor weight decay).
        freeze_backbone_steps: Optimizer steps during which only the head trains (backbone
            gradients dropped the same way): a head warm-up that protects pretrained backbone
            weights (``backbone_kwargs: {pretrained: true}``) from a random head's gradients.
        optimizer: ``"adamw"`` (fused where supported) or ``"sgd"`` (momentum 0.9).
        compile: ``torch.compile`` the student and teacher backbones (in place, so checkpoint
            keys do not change; one static graph per crop size). Head, loss and hooks stay eager.
        channels_last: Keep convolutional backbones' weights in channels-last memory format,
            which oneDNN and cuDNN convolutions run faster (1.2x for the quickstart ResNet on a
            CPU); ViTs are left as they are.
        backbone_dim: Feature width D of an ``nn.Module`` backbone. Needed only when the module
            has no integer ``num_features`` / ``embed_dim`` attribute and cannot run on a
            224 x 224 image (it is otherwise found by one test forward).
        monitors: Bring the collapse warning, the images/s log and the crop grid
            (:class:`~lightning_dino.eval.CollapseMonitor`, :class:`ThroughputLogger`,
            :class:`CropGridLogger`); False leaves only the callbacks the method needs.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        feature_grid: int = 0,
        drop_path_rate: float = 0.1,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        teacher_temp_per_step: bool = False,
        center_momentum: float = 0.9,
        centering: Literal["center", "sinkhorn_knopp"] = "center",
        koleo_loss_weight: float = 0.0,
        ibot_loss_weight: float = 0.0,
        gram_loss_weight: float = 0.0,
        gram_start_step: int = 0,
        gram_update_every: int = 0,
        gram_max_updates: int = 0,
        gram_remove_negatives: bool = False,
        gram_image_size: int = 0,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
        ibot_separate_head: bool = False,
        ibot_out_dim: int = 0,
        ibot_bottleneck_dim: int = 0,
        layerwise_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
        momentum_teacher: float = 0.996,
        momentum_teacher_end: float = 1.0,
        lr: float = 0.0005,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        freeze_backbone_steps: int = 0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        compile: bool = False,
        channels_last: bool = True,
        backbone_dim: int | None = None,
        monitors: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        validate_hyperparameters(self.hparams)
        head = dict(out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                    n_layers=n_head_layers, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer)
        patch_head = {**head, "out_dim": ibot_out_dim or out_dim,
                      "bottleneck_dim": ibot_bottleneck_dim or bottleneck_dim}
        self.student, self.teacher = build_student_teacher(
            backbone, head, drop_path_rate, backbone_kwargs, feature_grid, backbone_dim,
            mask_token=ibot_loss_weight > 0, channels_last=channels_last, compile=compile,
            patch_head_kwargs=patch_head if ibot_separate_head and ibot_loss_weight > 0 else None,
        )
        self.loss = DINOLoss(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, centering=centering
        )
        # The module applies the centre once per optimizer step (see on_before_optimizer_step).
        self.loss.defer_center_update = True
        for term_class in TERMS:
            term = term_class.from_hparams(self.hparams, self.teacher)
            if term is not None:
                self.add_module(term.name, term)  # checkpoint keys <name>.*
        self._brought_callbacks: list[Callback] = []
        self._check_next_batch = True
        self.crop_sizes: dict[str, list[int] | None] | None = None
        self.peak_lr = lr

    @property
    def terms(self) -> list[LossTerm]:
        """The optional loss terms this module trains with (iBOT, KoLeo, Gram), in order."""
        return [module for module in self.children() if isinstance(module, LossTerm)]

    def configure_callbacks(self) -> list[Callback]:
        """The teacher EMA is part of the method, so the module always brings it.

        It also brings the random-state checkpointing that makes resuming exact, and the collapse
        warning, the throughput log and the crop grid, unless the trainer already has one of
        those (then the user's own settings are kept). Lightning calls this hook on every process
        before ``prepare_data`` and ``setup``, so it is also where the model is checked against
        the data module (crop sizes, views, BatchNorm batch), before any data is read.
        """
        if self._trainer is not None:
            check_model_and_data(self, self.trainer)
        hp = self.hparams
        callbacks, self._brought_callbacks = callbacks_to_bring(
            self._trainer,
            [TeacherEMA(hp.momentum_teacher, hp.momentum_teacher_end), RandomStateCallback()],
            [CollapseMonitor, ThroughputLogger, CropGridLogger] if hp.monitors else [],
            self._brought_callbacks,
        )
        return callbacks

    def trainable_backbone(self, which: Literal["teacher", "student"] = "teacher") -> nn.Module:
        """A copy of one network's backbone to fine-tune: train mode, every parameter trainable.

        The module's own teacher is frozen (``requires_grad=False``) and follows the student;
        fine-tuning needs a separate, trainable copy::

            backbone = DINO.load_from_checkpoint("last.ckpt").trainable_backbone()

        Args:
            which: ``"teacher"`` (the network DINO evaluates and exports) or ``"student"``.

        Returns:
            A deep copy of the backbone, mapping (B, C, H, W) images to (B, D) features.
        """
        network = self.teacher if which == "teacher" else self.student
        return copy.deepcopy(network.backbone).train().requires_grad_(True)

    def forward(self, images: Tensor) -> Tensor:
        """Teacher backbone features, the representation DINO evaluates and exports.

        Args:
            images: Shape (B, C, H, W).

        Returns:
            Features of shape (B, D).
        """
        return self.teacher.backbone(images)

    @property
    def evaluated_backbone(self) -> nn.Module:
        """The EMA teacher's backbone: what monitors evaluate and ``export`` writes."""
        return self.teacher.backbone

    # Schedules -----------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Fix the run length and the peak learning rate the per-step schedules use.

        The run is the Trainer's: a Trainer that resumes (``ckpt_path``) or fits again after
        ``max_epochs`` was raised continues its step count, and every schedule continues from
        that step over the new run length. A Trainer at step 0 starts a new run from the
        module's current student and teacher: schedules from step 0 and the centres reset to 0.
        """
        self._check_next_batch = True
        if self.trainer.global_step == 0:
            self.loss.reset_center()
            for term in self.terms:
                term.start_run()
        self.start_schedules()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the crop sizes the run trained on in the checkpoint.

        ``export`` reads them when the data module was not
        :class:`~lightning_dino.data.MultiCropDataModule` (which saves its own settings).
        """
        if self.crop_sizes is not None:
            checkpoint["crop_sizes"] = self.crop_sizes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a checkpoint against this module before Lightning loads it, and settle it.

        Older checkpoints' keys are renamed; network-shaping hyperparameters that differ fail
        here, naming the keys; other differences (a new lr, a longer run) are this run's, with
        one warning; see :func:`~lightning_dino.training.resume.check_resume`.

        Raises:
            ResumeError: If the checkpoint's networks have another shape than this module's.
        """
        check_resume(self, checkpoint)

    def teacher_temp(self, epoch: int, step: int | None = None) -> float:
        """Teacher temperature at ``epoch`` (or optimizer ``step`` with ``teacher_temp_per_step``).

        A linear warmup from ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs
        (per epoch as DINO, or per step as DINOv2), then constant.
        """
        hp = self.hparams
        if hp.teacher_temp_per_step and step is not None:
            warmup_steps = round(hp.warmup_teacher_temp_epochs * self.steps_per_epoch)
            return teacher_temperature(step, hp.teacher_temp, hp.warmup_teacher_temp, warmup_steps)
        return teacher_temperature(
            epoch, hp.teacher_temp, hp.warmup_teacher_temp, hp.warmup_teacher_temp_epochs
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-tensor clip of unscaled gradients, last-layer and backbone freezes, centres."""
        self.clip_student_gradients(optimizer)
        if self.current_epoch < self.hparams.freeze_last_layer:
            drop_gradients(self.student.head.last_layer)
            if hasattr(self.student, "patch_head"):
                drop_gradients(self.student.patch_head.last_layer)
        if self.global_step < self.hparams.freeze_backbone_steps:
            drop_gradients(self.student.backbone)
        self.loss.update_center()
        for term in self.terms:
            term.before_optimizer_step()

    # Training ------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Let the loss terms see the EMA teacher before the step (a Gram snapshot when due)."""
        for term in self.terms:
            term.before_batch(self.global_step, self.teacher)

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """One DINO step: teacher targets, student outputs, the DINO loss and the active terms.

        Batches are ``crops``, ``(crops, labels)`` or ``{"crops": crops, ...}`` (see
        :func:`~lightning_dino.training.preflight.crops_of`); a run's first batch is checked
        against the model whatever data module produced it.
        """
        crops = crops_of(batch)
        if self._check_next_batch:  # a run's first batch, whatever data module produced it
            self.crop_sizes = check_first_batch(self, crops)
            self._check_next_batch = False
        temp = self.teacher_temp(self.current_epoch, self.global_step)
        terms = [term for term in self.terms if term.active(self.global_step)]
        masker = next((t for t in terms if MASKS in t.needs), None)
        outputs = forward_step(
            self.student,
            self.teacher,
            crops,
            self.hparams.n_global_crops,
            needs=frozenset().union(*(term.needs for term in terms)),
            draw_masks=getattr(masker, "draw_masks", None),
        )
        loss = self.loss(outputs.student_out, outputs.teacher_out, temp)
        logged = {"train/dino_loss": loss}
        for term in terms:
            logged[term.log_key] = term(outputs, temp)
            loss = loss + term.weight * logged[term.log_key]
        check_finite_loss(self, loss)
        return log_training_step(
            self,
            loss,
            logged,
            outputs.student_out,
            outputs.teacher_out,
            self.loss.center,
            self.hparams.student_temp,
            temp,
        )
