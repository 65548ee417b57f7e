"""The method base: the lifecycle that every method of the package shares.

A method (:class:`~lightning_dino.DINO`, :class:`~lightning_dino.Distillation`, or yours) is a
small class on :class:`Method`: it builds its networks in ``__init__``, names the network it
evaluates, brings the callbacks its networks need (a teacher EMA) and computes one step's loss
(:meth:`Method.compute_step`). The base owns everything around that:

* the batch forms (``crops``, ``(crops, labels)``, ``{"crops": ...}``) and the check of a run's
  first batch against the model, and the crop sizes it records;
* the checks of the model against the data module, made before any data is read, and the
  random-state checkpointing that makes a resume exact;
* ``forward`` and the evaluated network (what the monitors, ``export``, ``knn``, ``embed`` and
  ``probe`` use), recorded in every checkpoint;
* checkpoint loading: the resume checks (:func:`~lightning_dino.training.resume.check_resume`);
* optimisation of the ``student`` and the per-step schedules
  (:class:`~lightning_dino.training.optimization.StudentOptimization`), with the per-tensor clip
  before every optimizer step;
* logging the step (:func:`~lightning_dino.training.step_logging.log_step`) and stopping every
  process on a non-finite loss.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_dino.io.start_weights import (
    load_start_weights,
    pretrained_weights,
    start_file,
    start_state,
)
from lightning_dino.losses.term import LossTerm
from lightning_dino.networks.forward import GRAM_CROPS
from lightning_dino.networks.sharding import (
    all_reduce_unsharded_gradients,
    broadcast_buffers,
    is_sharded,
)
from lightning_dino.setting_names import setting
from lightning_dino.training.callbacks import callbacks_to_bring
from lightning_dino.training.checkpointing import RandomStateCallback, check_finite_loss
from lightning_dino.training.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.training.optimization import StudentOptimization
from lightning_dino.training.preflight import (
    check_first_batch,
    check_model_and_data,
    crops_of,
    extra_crops_of,
)
from lightning_dino.training.resume import check_resume, settle_epoch_end
from lightning_dino.training.sharding import shard_method
from lightning_dino.training.step_logging import StepResult, log_step

# (crops, labels), a bare list of crops, or {"crops": crops, ...}; see preflight.crops_of.
Batch = tuple[list[Tensor], Tensor] | list[Tensor] | dict[str, Any]

# One check of an argument: (holds, the argument's name, how to fix it).
Check = tuple[bool, str, str]


class Method(StudentOptimization, pl.LightningModule):
    """Base of a method: a ``student`` trained by a teacher, and the lifecycle around it.

    A subclass calls ``super().__init__()``, then :meth:`save_arguments` and
    :meth:`validate_arguments`, builds ``self.student`` (what the optimizer trains) and the
    network it evaluates, and implements :meth:`compute_step`. It may override
    :meth:`method_callbacks`, :meth:`monitor_types`, :meth:`start_run`,
    :meth:`before_optimizer_step`, :meth:`argument_checks`, :meth:`check_batch_size`,
    :meth:`schedule_warnings` and :meth:`resume_warnings`.

    Its arguments must include those of the optimisation: ``lr``, ``min_lr``, ``warmup_epochs``,
    ``weight_decay``, ``weight_decay_end``, ``clip_grad``, ``layerwise_decay``,
    ``patch_embed_lr_mult``, ``optimizer``, and ``n_global_crops`` and ``monitors``; it may have
    ``adamw_betas``, ``lr_scaling`` and ``clip_mode`` (DINO's choices when absent).

    Attributes:
        evaluated_network: The attribute holding the network (with a ``backbone``) that the method
            trains for its users: ``forward`` runs its backbone, monitors evaluate it, ``export``
            writes it. Recorded in every checkpoint as ``evaluated_network``.
        frozen_networks: Attributes holding networks that never train (a distillation teacher);
            recorded in every checkpoint, and ``export`` refuses them.
        structural_keys: Arguments that shape the saved networks beyond the common ones
            (:data:`~lightning_dino.training.resume.STRUCTURAL_KEYS`): a checkpoint written with
            other values cannot be resumed.
    """

    evaluated_network: ClassVar[str] = "teacher"
    frozen_networks: ClassVar[tuple[str, ...]] = ()
    structural_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self._brought_callbacks: list[Callback] = []
        self._check_next_batch = True
        self._checked_shapes: set[tuple[tuple[int, ...], ...]] = set()
        self.crop_sizes: dict[str, list[int] | None] | None = None
        self._checked_before_load = False

    # Arguments -------------------------------------------------------------------------------

    def save_arguments(self) -> None:
        """Save the calling ``__init__``'s arguments as hyperparameters, modules left out.

        An ``nn.Module`` argument (the user's own backbone or teacher) cannot be saved as a
        hyperparameter; it is passed again when loading (``load_from_checkpoint(path,
        backbone=...)``).
        """
        frame = inspect.currentframe().f_back  # the subclass's __init__
        modules = [
            name for name, value in frame.f_locals.items()
            if name != "self" and isinstance(value, nn.Module)
        ]
        self.save_hyperparameters(ignore=modules or None, frame=frame)
        self.peak_lr = self.hparams.lr

    def argument_checks(self) -> list[Check]:
        """The checks of the arguments every method has; a method adds its own rows.

        Returns:
            ``(holds, argument, fix)`` rows.
        """
        hp = self.hparams
        return [
            (hp.lr > 0, "lr", "use a positive base learning rate (0.0005)"),
            (hp.min_lr >= 0, "min_lr", "use a non-negative value"),
            (hp.warmup_epochs >= 0, "warmup_epochs", "use a non-negative number of epochs"),
            (hp.clip_grad >= 0, "clip_grad", "use 0 to disable clipping or a positive norm"),
            (0 < hp.layerwise_decay <= 1, "layerwise_decay", "use a value in (0, 1] (0.9)"),
            (hp.patch_embed_lr_mult > 0, "patch_embed_lr_mult", "use a positive factor (0.2)"),
            (hp.n_global_crops in (1, 2), "n_global_crops", "use 1 or 2 global crops"),
            (hp.optimizer in ("adamw", "sgd"), "optimizer", "use adamw or sgd"),
            (hp.get("lr_scaling", "linear_wrt_256") in ("linear_wrt_256", "sqrt_wrt_1024"),
             "lr_scaling", "use linear_wrt_256 (DINO) or sqrt_wrt_1024 (DINOv3)"),
            (hp.get("clip_mode", "per_tensor") in ("per_tensor", "per_module"), "clip_mode",
             "use per_tensor (DINO) or per_module (DINOv2, DINOv3)"),
            (_betas_ok(hp.get("adamw_betas", (0.9, 0.999))), "adamw_betas",
             "use two values in [0, 1), e.g. [0.9, 0.999] (DINOv3's ViT-7B: [0.9, 0.99])"),
            (hp.get("backbone_warmup_steps", 0) >= 0, "backbone_warmup_steps", "use 0 or more"),
        ]

    def validate_arguments(self) -> None:
        """Fail fast, before any data is read, on arguments that cannot work.

        Raises:
            ValueError: Naming the argument as the user set it (``DINO(lr=-1)`` or
                ``--model.lr=-1``) and the fix.
        """
        for holds, key, fix in self.argument_checks():
            if not holds:
                raise ValueError(f"{setting(self, key, self.hparams[key])} is invalid: {fix}.")

    # What a method brings ---------------------------------------------------------------------

    def method_callbacks(self) -> list[Callback]:
        """New instances of the callbacks the method needs (its teacher EMA); none here."""
        return []

    def monitor_types(self) -> list[type[Callback]]:
        """The monitors brought with ``monitors=True`` when the trainer has none of their type."""
        return [ThroughputLogger, CropGridLogger]

    def configure_callbacks(self) -> list[Callback]:
        """The method's callbacks, the random-state checkpointing (exact resume), the monitors.

        A monitor is brought only when the trainer has none of its type (the user's own settings
        are kept). Lightning calls this hook on every process before ``prepare_data`` and
        ``setup``, so it is also where the model is checked against the data module (crop sizes,
        views, batch size), before any data is read.
        """
        if self._trainer is not None:
            check_model_and_data(self, self.trainer)
        monitors = self.monitor_types() if self.hparams.get("monitors", True) else []
        callbacks, self._brought_callbacks = callbacks_to_bring(
            self._trainer,
            [*self.method_callbacks(), RandomStateCallback()],
            monitors,
            self._brought_callbacks,
        )
        return callbacks

    # The evaluated network -------------------------------------------------------------------

    @property
    def evaluated_backbone(self) -> nn.Module:
        """The backbone of :attr:`evaluated_network`: what monitors evaluate and export writes."""
        return getattr(self, self.evaluated_network).backbone

    def forward(self, images: Tensor) -> Tensor:
        """Features of the evaluated backbone, the representation the method trains.

        Args:
            images: Shape (B, C, H, W).

        Returns:
            Features of shape (B, D).
        """
        return self.evaluated_backbone(images)

    def trainable_backbone(self, which: str | None = None) -> nn.Module:
        """A copy of one network's backbone to fine-tune: train mode, every parameter trainable.

        The evaluated network is frozen (``requires_grad=False``) and follows the student;
        fine-tuning needs a separate, trainable copy.

        Args:
            which: The network (``"teacher"``, ``"student"``, ``"ema"``); None: the evaluated one.

        Returns:
            A deep copy of the backbone, mapping (B, C, H, W) images to (B, D) features.

        Examples:
            >>> model = DINO.load_from_checkpoint("last.ckpt")  # doctest: +SKIP
            >>> backbone = model.trainable_backbone()  # doctest: +SKIP
        """
        network = getattr(self, which or self.evaluated_network)
        return copy.deepcopy(network.backbone).train().requires_grad_(True)

    # Start weights ---------------------------------------------------------------------------

    def prepare_start(
        self,
        start_from: str | None,
        pretrained: dict[str, Any] | None,
        backbone: str | nn.Module,
        feature_grid: int = 0,
    ) -> None:
        """Load the weights the run starts from now, or when a run starts from step 0.

        Weights whose file is here are read now; a missing file (a module rebuilt from the new
        run's own checkpoint does not need it) or timm's hub are read by ``on_train_start`` at
        step 0 (:mod:`~lightning_dino.io.start_weights`).

        Args:
            start_from: A ``.ckpt`` of this package, an export directory or a weights file.
            pretrained: ``backbone_kwargs`` whose ``pretrained`` weights wait (see
                :func:`~lightning_dino.io.start_weights.split_pretrained`), or None.
            backbone: The timm name (or module) of the student's backbone.
            feature_grid: Its grid pooling.
        """
        self._start = {"start_from": start_from, "pretrained": pretrained, "backbone": backbone,
                       "feature_grid": feature_grid}
        here = start_from is None or Path(start_from).expanduser().exists()
        if pretrained is None and here:
            self._load_start()

    def _load_start(self) -> None:
        """Read the start weights into the student and the teacher (once)."""
        start, self._start = getattr(self, "_start", None), None
        if start is None:
            return
        if start["pretrained"] is not None:
            weights = pretrained_weights(start["backbone"], start["pretrained"],
                                         start["feature_grid"], self, "backbone_kwargs")
            state = {f"backbone.{k}": v for k, v in weights.items()}
            load_start_weights(self.student, getattr(self, self.evaluated_network), state, self)
        if start["start_from"] is not None:
            path = start_file(start["start_from"], self)
            state, _ = start_state(path, start["backbone"], self.hparams.get("backbone_kwargs"),
                                   start["feature_grid"])
            fresh = load_start_weights(self.student, getattr(self, self.evaluated_network), state,
                                       self)
            if fresh:
                rank_zero_info(f"start_from {path.name}: new {', '.join(fresh[:6])}"
                               + (" ..." if len(fresh) > 6 else ""))

    # Run lifecycle ---------------------------------------------------------------------------

    def start_run(self) -> None:
        """A run starts at step 0: reset what an earlier run left (centres); nothing here."""

    def on_train_start(self) -> None:
        """Fix the run length and the peak learning rate the per-step schedules use.

        The run is the Trainer's: a Trainer that resumes (``ckpt_path``) or fits again after
        ``max_epochs`` was raised continues its step count, and every schedule continues from
        that step over the new run length. A Trainer at step 0 starts a new run from the
        module's current networks (:meth:`start_run`: the centres reset to their start).
        """
        self._check_next_batch = True
        if self.trainer.global_step == 0:
            self._load_start()
            self.start_run()
        self.start_schedules()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the evaluated and frozen networks, and the crop sizes the run trained on.

        ``export``, ``load_backbone``, ``knn``, ``probe`` and ``embed`` read
        ``evaluated_network``; ``export`` reads the crop sizes when the data module was not
        :class:`~lightning_dino.data.MultiCropDataModule` (which saves its own settings).
        """
        checkpoint["evaluated_network"] = self.evaluated_network
        checkpoint["frozen_networks"] = list(self.frozen_networks)
        if self.crop_sizes is not None:
            checkpoint["crop_sizes"] = self.crop_sizes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a checkpoint against this module before Lightning loads it, and settle it.

        Older checkpoints' keys are renamed; network-shaping hyperparameters that differ fail
        here, naming the keys; other differences (a new lr, a longer run) are this run's, with
        one warning; see :func:`~lightning_dino.training.resume.check_resume`. A sharded
        checkpoint was checked before its shards were read (:meth:`check_resume_before_load`).

        Raises:
            ResumeError: If the checkpoint's networks have another shape than this module's.
        """
        if self._checked_before_load:
            self._checked_before_load = False
            settle_epoch_end(checkpoint)
            return
        check_resume(self, checkpoint)

    def check_resume_before_load(self, metadata: dict[str, Any]) -> None:
        """The resume checks of a sharded checkpoint, from its metadata, before any shard loads."""
        check_resume(self, metadata)
        self._checked_before_load = True

    # Sharding --------------------------------------------------------------------------------

    def sharded_networks(self) -> list[nn.Module]:
        """The networks a ``ModelParallelStrategy`` shards, each alike.

        The student, the evaluated and frozen networks, and those the loss terms keep (a Gram
        teacher).
        """
        names = dict.fromkeys(("student", self.evaluated_network, *self.frozen_networks))
        networks = [getattr(self, name) for name in names]
        return networks + [n for term in self.terms for n in term.networks()]

    def configure_model(self) -> None:
        """Shard the networks under a ``ModelParallelStrategy``; otherwise nothing.

        See :mod:`~lightning_dino.training.sharding`.
        """
        if getattr(self, "_device_mesh", None) is not None:
            shard_method(self, self.sharded_networks())

    def schedule_warnings(self) -> list[str]:
        """The optimisation's warnings, and a pretrained backbone started with new heads at once.

        A backbone from pretrained weights without its heads (``start_from`` an export or a
        weights file, or timm's ``pretrained``) whose heads are new gets their first, random
        gradients unless ``freeze_backbone_steps`` trains the heads first.
        """
        messages = super().schedule_warnings()
        hp = self.hparams
        start = str(hp.get("start_from") or "")
        pretrained = (start and not start.endswith(".ckpt")) or (
            (hp.get("backbone_kwargs") or {}).get("pretrained"))
        fresh_run = self._trainer is None or self.trainer.global_step == 0
        unprotected = "freeze_backbone_steps" in hp and not hp.freeze_backbone_steps
        if pretrained and fresh_run and unprotected:
            messages.append(
                f"the backbone starts from pretrained weights and the heads are new, with "
                f"{setting(self, 'freeze_backbone_steps', 0)}: the new heads' first gradients "
                f"can wreck the backbone; train the heads first, e.g. "
                f"{setting(self, 'freeze_backbone_steps', 500)} (configs/continue_pretrained.yaml)"
            )
        return messages

    def resume_warnings(self, saved: dict[str, Any]) -> list[str]:
        """Warnings for resuming a checkpoint with these hyperparameters; none here."""
        return []

    @property
    def terms(self) -> list[LossTerm]:
        """The loss terms the method trains with (its child modules that are terms), in order."""
        return [module for module in self.children() if isinstance(module, LossTerm)]

    def check_batch_size(self, batch_size: int) -> None:
        """Raise when the method cannot train on ``batch_size`` images per device: its terms'."""
        for term in self.terms:
            term.check_batch_size(batch_size, self)

    def check_data(self, data: dict[str, Any]) -> None:
        """Raise (or warn) on data-module settings the method or its terms cannot use.

        Gram crops for a method whose terms do not read them are made for nothing: a warning.

        Args:
            data: The data module's hyperparameters (``MultiCropDataModule``'s arguments).
        """
        reads_gram_crops = any(GRAM_CROPS in term.needs for term in self.terms)
        if data.get("gram_crop_size") and not reads_gram_crops:
            rank_zero_warn(
                f"{setting('data', 'gram_crop_size', data['gram_crop_size'])} makes crops for a "
                f"Gram teacher, but this {type(self).__name__} has no Gram anchoring: they are "
                f"made for nothing; use {setting('data', 'gram_crop_size', 0)}"
            )
        for term in self.terms:
            term.check_data(data, self)

    # The step --------------------------------------------------------------------------------

    def compute_step(self, crops: list[Tensor], extra_crops: dict[str, list[Tensor]]) -> StepResult:
        """The method's loss for one batch of crops.

        Args:
            crops: Crop-major (B, C, H, W) tensors, the ``n_global_crops`` global crops first.
            extra_crops: The batch's other crops by name (``"gram"``: the Gram teacher's crops
                when the data module makes them); empty for most batches.

        Returns:
            The loss, its parts and (for a method with prototypes) the scores the collapse
            diagnostics read.
        """
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """One step: the batch's crops, the method's loss, the finite-loss check, the logs.

        Batches are ``crops``, ``(crops, labels)`` or ``{"crops": crops, ...}`` (see
        :func:`~lightning_dino.training.preflight.crops_of`); a run's first batch, and the first
        batch of every other crop size (a crop-size mix), is checked against the model whatever
        data module produced it.
        """
        crops = crops_of(batch)
        if is_sharded(self.student):  # DDP's buffer broadcast: every rank's statistics rank 0's
            broadcast_buffers(self)
        shapes = tuple(tuple(crop.shape[-2:]) for crop in crops)
        if self._check_next_batch or shapes not in self._checked_shapes:  # new crop sizes
            sizes = check_first_batch(self, crops)
            if self._check_next_batch:
                self.crop_sizes, self._check_next_batch = sizes, False
            self._checked_shapes.add(shapes)
        result = self.compute_step(crops, extra_crops_of(batch))
        check_finite_loss(self, result.loss)
        return log_step(self, result)

    def before_optimizer_step(self) -> None:
        """After the clip, before the optimizer step (freezes, centres); nothing here."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-tensor clip of the student's unscaled gradients, then the method's own updates.

        Sharded, the gradients of parameters no shard holds (a mask token) are averaged first.
        """
        if is_sharded(self.student):
            all_reduce_unsharded_gradients(self.student)
        self.clip_student_gradients(optimizer)
        self.before_optimizer_step()


def _betas_ok(betas: Any) -> bool:
    """Two AdamW betas, each in [0, 1)."""
    return len(betas) == 2 and all(0.0 <= float(beta) < 1.0 for beta in betas)
