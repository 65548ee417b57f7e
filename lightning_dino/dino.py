"""The DINO LightningModule: student, momentum teacher, loss, optimizer and schedules."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_dino.backbones import build_student_teacher, is_vit, vit_tokens
from lightning_dino.checkpointing import RandomStateCallback, non_finite_fixes
from lightning_dino.eval.diagnostics import (
    CollapseMonitor,
    collapse_statistics,
    teacher_entropy_ratio,
)
from lightning_dino.gram import GramLoss
from lightning_dino.hyperparameters import validate_hyperparameters
from lightning_dino.ibot import iBOTPatchLoss
from lightning_dino.koleo import KoLeoLoss
from lightning_dino.loss import DINOLoss
from lightning_dino.masking import batch_masks
from lightning_dino.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.naming import setting
from lightning_dino.optimization import (
    clip_gradients_per_tensor,
    parameter_groups,
    unscale_fp16_gradients,
)
from lightning_dino.preflight import (
    check_first_batch,
    check_model_and_data,
    crops_of,
    schedule_warnings,
)
from lightning_dino.resume import (
    ResumeError,
    hyperparameter_changes,
    settle_epoch_end,
    structural_change_message,
)
from lightning_dino.schedules import StepScheduler, cosine_schedule, teacher_temperature
from lightning_dino.sinkhorn_knopp import sinkhorn_knopp
from lightning_dino.teacher import TeacherEMA

# (crops, labels), a bare list of crops, or {"crops": crops, ...}; see preflight.crops_of.
Batch = tuple[list[Tensor], Tensor] | list[Tensor] | dict[str, Any]


class DINO(pl.LightningModule):
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
        warmup_teacher_temp_epochs: Epochs of linear teacher-temperature warmup (per epoch).
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
        ibot_mask_ratio: (min, max) fraction of the patches masked in a masked image.
        ibot_mask_probability: Fraction of the global crops that are masked.
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
        center_momentum: float = 0.9,
        centering: Literal["center", "sinkhorn_knopp"] = "center",
        koleo_loss_weight: float = 0.0,
        ibot_loss_weight: float = 0.0,
        gram_loss_weight: float = 0.0,
        gram_start_step: int = 0,
        gram_update_every: int = 0,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
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
        self.student, self.teacher = build_student_teacher(
            backbone,
            head_kwargs={
                "out_dim": out_dim,
                "hidden_dim": hidden_dim,
                "bottleneck_dim": bottleneck_dim,
                "n_layers": n_head_layers,
                "use_bn": use_bn_in_head,
                "norm_last_layer": norm_last_layer,
            },
            drop_path_rate=drop_path_rate,
            backbone_kwargs=backbone_kwargs,
            feature_grid=feature_grid,
            backbone_dim=backbone_dim,
            mask_token=ibot_loss_weight > 0,
        )
        for network in (self.student, self.teacher):
            if channels_last and not is_vit(network.backbone):
                network.backbone.to(memory_format=torch.channels_last)
            if compile:
                network.backbone.compile(dynamic=False)
        self.loss = DINOLoss(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, centering=centering
        )
        self.koleo = KoLeoLoss()
        if ibot_loss_weight > 0:  # only then: its centre buffer joins the checkpoints
            self.ibot = iBOTPatchLoss(out_dim, student_temp, center_momentum)
        if gram_loss_weight > 0:
            if not is_vit(self.teacher.backbone):
                raise ValueError(
                    f"{setting('model', 'gram_loss_weight')} needs a ViT backbone (patch tokens)"
                )
            self.gram_teacher = copy.deepcopy(self.teacher.backbone).requires_grad_(False)
            self.gram = GramLoss()
        # The module applies the centre once per optimizer step (see on_before_optimizer_step).
        self.loss.defer_center_update = True
        self._brought_callbacks: list[Callback] = []
        self._check_next_batch = True
        self.crop_sizes: dict[str, list[int] | None] | None = None
        self.total_steps = 1
        self.steps_per_epoch = 1
        self.peak_lr = lr

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
        callbacks: list[Callback] = [
            TeacherEMA(self.hparams.momentum_teacher, self.hparams.momentum_teacher_end),
            RandomStateCallback(),
        ]
        present = list(self.trainer.callbacks) if self._trainer is not None else []
        # A second fit on the same Trainer still holds the ones brought the first time.
        kept = [c for c in present if any(c is mine for mine in self._brought_callbacks)]
        callbacks = [c for c in callbacks if type(c) not in {type(k) for k in kept}]
        monitors = (CollapseMonitor, ThroughputLogger, CropGridLogger)
        for default in monitors if self.hparams.monitors else ():
            if not any(isinstance(c, default) for c in present):
                callbacks.append(default())
        self._brought_callbacks = [*kept, *callbacks]
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

    # Schedules -----------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Fix the run length and the peak learning rate the per-step schedules use.

        The run is the Trainer's: a Trainer that resumes (``ckpt_path``) or fits again after
        ``max_epochs`` was raised continues its step count, and every schedule continues from
        that step over the new run length. A Trainer at step 0 starts a new run from the
        module's current student and teacher: schedules from step 0 and the centre reset to 0.
        """
        trainer = self.trainer
        self._check_next_batch = True
        if trainer.global_step == 0:
            self.loss.reset_center()
            if self.hparams.ibot_loss_weight > 0:
                self.ibot.reset_center()
        self.total_steps = int(trainer.estimated_stepping_batches)
        batches = trainer.num_training_batches
        accumulate = trainer.accumulate_grad_batches
        self.steps_per_epoch = (
            max(1, math.ceil(batches / accumulate))
            if math.isfinite(batches)
            else max(1, self.total_steps // max(1, trainer.max_epochs or 1))
        )
        self.peak_lr = self.hparams.lr * self.global_batch_size() / 256.0
        for message in schedule_warnings(self):
            rank_zero_warn(message)
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, StepScheduler):
            scheduler.sync(self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the crop sizes the run trained on in the checkpoint.

        ``export`` reads them when the data module was not
        :class:`~lightning_dino.data.MultiCropDataModule` (which saves its own settings).
        """
        if self.crop_sizes is not None:
            checkpoint["crop_sizes"] = self.crop_sizes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a checkpoint against this module before Lightning loads it, and settle it.

        * A checkpoint whose network-shaping hyperparameters (backbone, head sizes...) differ
          from this module's fails here, naming the keys, instead of in ``load_state_dict``.
        * Other differences are what the command line changed on resume (a new lr, a longer
          run): this module's values win, and one warning lists them.
        * An end-of-epoch checkpoint's loop state is rewritten so that resuming it continues
          exactly with ``max_steps`` too (see :func:`~lightning_dino.resume.settle_epoch_end`).

        Raises:
            ResumeError: If the checkpoint's networks have another shape than this module's.
        """
        saved = checkpoint.get("hyper_parameters") or {}
        if saved and "backbone" not in saved and isinstance(self.hparams.get("backbone"), str):
            raise ResumeError(
                "this checkpoint was trained with your own nn.Module backbone, which a checkpoint "
                "cannot rebuild: pass the same module again, e.g. "
                "DINO.load_from_checkpoint(path, backbone=MyBackbone(...))"
            )
        if self._trainer is None:  # load_from_checkpoint: the hyperparameters are the file's
            return
        path = str(self.trainer.ckpt_path)
        changes = hyperparameter_changes(saved, self.hparams)
        message = structural_change_message(changes, path)
        if message:
            raise ResumeError(message)
        if changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            rank_zero_warn(
                f"resuming from {path} with hyperparameters that differ from the checkpoint's "
                f"(this run's values are used): {listed}"
            )
        settle_epoch_end(checkpoint)

    def learning_rate(self, step: int) -> float:
        """Learning rate at optimizer step ``step``: linear warmup, then cosine to ``min_lr``."""
        return cosine_schedule(
            step,
            self.total_steps,
            start=self.peak_lr,
            end=self.hparams.min_lr,
            warmup_steps=round(self.hparams.warmup_epochs * self.steps_per_epoch),
        )

    def weight_decay(self, step: int) -> float:
        """Weight decay at step ``step``: cosine from ``weight_decay`` to ``weight_decay_end``."""
        return cosine_schedule(
            step, self.total_steps, self.hparams.weight_decay, self.hparams.weight_decay_end
        )

    def teacher_temp(self, epoch: int) -> float:
        """Teacher temperature at ``epoch`` (per-epoch linear warmup, then constant)."""
        return teacher_temperature(
            epoch,
            self.hparams.teacher_temp,
            self.hparams.warmup_teacher_temp,
            self.hparams.warmup_teacher_temp_epochs,
        )

    def global_batch_size(self) -> int:
        """Per-device batch x devices x gradient accumulation, the batch the lr is scaled by."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            per_device = self.trainer.train_dataloader.batch_size
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    # Optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or SGD) over the student only, with decay / no-decay parameter groups.

        The learning-rate and weight-decay schedules come as a :class:`StepScheduler` that
        Lightning steps after every optimizer step (``LearningRateMonitor`` logs what each step
        used); :meth:`on_train_start` sets them for the step the run starts at.
        """
        groups = parameter_groups(
            self.student, self.hparams.layerwise_decay, self.hparams.patch_embed_lr_mult
        )
        if self.hparams.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        else:
            fused = self.device.type in ("cuda", "cpu")
            optimizer = torch.optim.AdamW(groups, lr=0.0, fused=fused)
        scheduler = StepScheduler(optimizer, self.learning_rate, self.weight_decay)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-tensor clip of unscaled gradients, last-layer and backbone freezes, centre."""
        if self.hparams.clip_grad > 0:
            unscale_fp16_gradients(self.trainer, optimizer)
            clip_gradients_per_tensor(list(self.student.parameters()), self.hparams.clip_grad)
        if self.current_epoch < self.hparams.freeze_last_layer:
            for param in self.student.head.last_layer.parameters():
                param.grad = None
        if self.global_step < self.hparams.freeze_backbone_steps:
            for param in self.student.backbone.parameters():
                param.grad = None
        self.loss.update_center()
        if self.hparams.ibot_loss_weight > 0:
            self.ibot.update_center()

    # Training ------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """One DINO step: teacher on global crops, student on all crops, loss.

        Batches are ``crops``, ``(crops, labels)`` or ``{"crops": crops, ...}`` (see
        :func:`~lightning_dino.preflight.crops_of`); a run's first batch is checked against the
        model whatever data module produced it.
        """
        crops = crops_of(batch)
        n_global = self.hparams.n_global_crops
        if self._check_next_batch:
            check_first_batch(self, crops)
            self._check_next_batch = False
            self.crop_sizes = {
                "global": list(crops[0].shape[-2:]),
                "local": list(crops[n_global].shape[-2:]) if len(crops) > n_global else None,
            }
        hp = self.hparams
        temp = self.teacher_temp(self.current_epoch)
        gram_on = hp.gram_loss_weight > 0 and self.global_step >= hp.gram_start_step
        if hp.ibot_loss_weight > 0 or gram_on:
            student_out, teacher_out, features, ibot_loss, patch_tokens = self._token_forward(
                crops, temp
            )
        else:
            with torch.no_grad():
                teacher_out = self.teacher(crops[:n_global])
            if hp.koleo_loss_weight > 0:
                student_out, features = self.student.forward_with_features(crops)
            else:
                student_out = self.student(crops)
        dino_loss = self.loss(student_out, teacher_out, temp)
        terms = {"train/dino_loss": dino_loss}
        loss = dino_loss
        if hp.ibot_loss_weight > 0:
            terms["train/ibot_loss"] = ibot_loss
            loss = loss + hp.ibot_loss_weight * ibot_loss
        if gram_on:
            with torch.no_grad():
                images = torch.cat(crops[:n_global])
                anchors = vit_tokens(self.gram_teacher, images)
            terms["train/gram_loss"] = self.gram(
                patch_tokens, anchors[:, self.gram_teacher.num_prefix_tokens :]
            )
            loss = loss + hp.gram_loss_weight * terms["train/gram_loss"]
        if hp.koleo_loss_weight > 0:
            # Per global crop, so that two crops of one image are never neighbours (DINOv2).
            terms["train/koleo_loss"] = sum(self.koleo(f) for f in features[:n_global])
            loss = loss + hp.koleo_loss_weight * terms["train/koleo_loss"]
        # Decided together, so that every process stops (one process raising alone would leave
        # the others waiting in the next collective).
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            raise FloatingPointError(
                f"non-finite DINO loss (here {loss.item()}) at global step {self.global_step}, "
                f"epoch {self.current_epoch}. Likely fixes: {non_finite_fixes()}. The last "
                "checkpoint written before this step is intact."
            )
        batch_size = crops[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if len(terms) > 1:
            self.log_dict(terms, batch_size=batch_size, sync_dist=True)
        # The epoch mean, for ModelCheckpoint / EarlyStopping (train/loss is each step's value).
        self.log(
            "train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=batch_size,
            sync_dist=True,
        )
        if not self._writes_logs_this_step():
            # The CollapseMonitor needs the entropy ratio every step; the rest only feeds the logs.
            ratio = teacher_entropy_ratio(teacher_out, self.loss.center, temp)
            return {"loss": loss, "diagnostics": {"teacher_entropy_ratio": ratio}}
        diagnostics = collapse_statistics(
            student_out, teacher_out, self.loss.center, self.hparams.student_temp, temp
        )
        decay_group = self.optimizers().optimizer.param_groups[0]
        self.log_dict(
            {
                "train/lr": decay_group["lr"],
                "train/weight_decay": decay_group["weight_decay"],
                "train/teacher_temp": temp,
                **{f"diagnostics/{name}": value for name, value in diagnostics.items()},
            },
            batch_size=batch_size,
        )
        return {"loss": loss, "diagnostics": diagnostics}

    def _token_forward(
        self, crops: list[Tensor], teacher_temp: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """Run both networks token-wise on the global crops (masked for iBOT when it is on).

        Returns:
            ``(student logits (n_crops, B, K), teacher logits (n_global, B, K), student
            features (n_crops, B, D), iBOT loss or None, student global patch tokens
            (n_global * B, N, D))``.
        """
        n_global = self.hparams.n_global_crops
        ibot = self.hparams.ibot_loss_weight > 0
        batch, _, height, width = crops[0].shape
        grid = self.student.backbone.patch_embed.dynamic_feat_size((height, width))
        if ibot:
            masks = batch_masks(
                n_global * batch,
                *grid,
                ratio=tuple(self.hparams.ibot_mask_ratio),
                probability=self.hparams.ibot_mask_probability,
            )
        else:
            masks = torch.zeros(n_global * batch, grid[0] * grid[1], dtype=torch.bool)
        masks = masks.to(crops[0].device)
        with torch.no_grad():
            teacher_out, teacher_patches, _, _ = self.teacher.forward_masked(
                crops[:n_global], n_global, masks, mask_input=False
            )
        student_out, student_patches, features, patch_tokens = self.student.forward_masked(
            crops, n_global, masks, mask_input=ibot
        )
        if not ibot:
            return student_out, teacher_out, features, None, patch_tokens
        if self.hparams.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp(teacher_patches, teacher_temp)
        else:
            targets = self.ibot.teacher_probs(teacher_patches, teacher_temp)
            self.ibot.accumulate_center(teacher_patches)  # applied in on_before_optimizer_step
        ibot_loss = self.ibot(student_patches, targets, masks)
        return student_out, teacher_out, features, ibot_loss, patch_tokens

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Take a new Gram teacher from the EMA teacher when one is due."""
        hp = self.hparams
        if hp.gram_loss_weight <= 0:
            return
        since = self.global_step - hp.gram_start_step
        every = hp.gram_update_every
        if since == 0 or (every > 0 and since > 0 and since % every == 0):
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())

    def _writes_logs_this_step(self) -> bool:
        """Whether the loggers record this step (every ``log_every_n_steps``, and at the end).

        Schedule values and collapse diagnostics are computed and logged only on those steps:
        values logged on other steps never reach a logger. Lightning's own monitors
        (``LearningRateMonitor``, ``ThroughputMonitor``) ask the logger connector the same way.
        """
        trainer = self.trainer
        return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)
