"""The DINO method: student, momentum teacher, the DINO loss and its optional loss terms.

Reference: Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021
(``main_dino.py`` of facebookresearch/dino); the optional terms are DINOv2's (iBOT, KoLeo) and
DINOv3's (Gram anchoring). One step: the teacher's targets for the global crops, the student's
outputs for every crop (:func:`~lightning_dino.networks.forward.forward_step`, shaped by what the
active terms need), the DINO loss plus the terms' weighted losses. The lifecycle around the step
(batches, checks, callbacks, checkpoints, optimisation) is the method base's
(:class:`~lightning_dino.training.method.Method`).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_dino.eval.diagnostics import CollapseMonitor
from lightning_dino.io.start_weights import split_pretrained
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.gram import GramTerm
from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.losses.koleo import KoLeoTerm
from lightning_dino.losses.term import LossTerm, add_term_losses, forward_request
from lightning_dino.networks.backbones import build_student_teacher
from lightning_dino.networks.forward import forward_step
from lightning_dino.networks.head import head_arguments
from lightning_dino.networks.rope import use_rope_rescale
from lightning_dino.setting_names import setting
from lightning_dino.training.ema import TeacherEMA
from lightning_dino.training.method import Batch, Check, Method
from lightning_dino.training.optimization import drop_gradients
from lightning_dino.training.schedules import teacher_temperature
from lightning_dino.training.step_logging import PrototypeScores, StepResult

# The optional loss terms, in the order they are summed. Adding a term: its class in losses/,
# one entry here, its arguments in DINO.__init__ (documented in the term's docstring).
TERMS: tuple[type[LossTerm], ...] = (KoLeoTerm, iBOTTerm, GramTerm)


class DINO(Method):
    """DINO self-distillation with a momentum teacher (Caron et al., ICCV 2021).

    Defaults are the reference's command-line defaults (``main_dino.py``); the paper's boosted
    recipe (teacher temperature 0.04 -> 0.07 over 30 epochs, ``norm_last_layer=False``) is a config.

    Training batches are ``(crops, labels)`` (labels ignored) or a bare list of crop-major tensors
    ``[g1, g2, l1..lN]``, each (B, C, H, W). The teacher sees the first ``n_global_crops`` under
    no_grad; the student sees all, one backbone call per resolution and one head call.

    Args:
        backbone: A timm model name (any timm model; ViTs get dynamic image size) or an
            ``nn.Module`` returning (B, D) features.
        backbone_kwargs: Extra ``timm.create_model`` arguments (``img_size``, ``patch_size``...).
        feature_grid: 0 keeps the backbone's pooling; g > 0 average-pools a CNN's last feature
            map to a g x g grid and flattens it, or appends a ViT's patch tokens averaged to a
            g x g grid to its class token (for small, centred images such as Fashion-MNIST).
        drop_path_rate: Stochastic depth of the student backbone (the teacher has none).
        rope_rescale_coords: DINOv3's training-time rescaling of the student's rotary
            coordinates, a log-uniform factor in [1/r, r] per block (2 in DINOv3; 0 = off;
            timm's ``*_dinov3`` backbones; see :mod:`~lightning_dino.networks.rope`).
        out_dim: Number of prototypes K of the head.
        hidden_dim: Hidden width of the head's MLP.
        bottleneck_dim: Dimension of the head's L2-normalised bottleneck.
        n_head_layers: Number of Linear layers of the head's MLP.
        use_bn_in_head: BatchNorm in the head's MLP.
        norm_last_layer: Freeze the weight-norm magnitude of the student's last layer at 1.
        head_weight_norm: Weight-normalise the heads' last layer (DINO, DINOv2); False: a plain
            Linear, as DINOv3 (``norm_last_layer`` then does not apply).
        n_global_crops: How many leading crops are global (teacher) views.
        student_temp: Student temperature.
        teacher_temp: Teacher temperature after the warmup.
        warmup_teacher_temp: Teacher temperature at epoch 0.
        warmup_teacher_temp_epochs: Epochs of linear teacher-temperature warmup.
        teacher_temp_per_step: Warm the teacher temperature up per optimizer step (DINOv2)
            instead of per epoch (DINO; the temperature of an epoch is constant).
        center_momentum: EMA momentum of the loss centre; 1.0 keeps the centre at 0.
        centering: ``"center"`` (DINO's EMA centre) or ``"sinkhorn_knopp"`` (DINOv2's option,
            3 iterations over the global batch).
        local_loss_weight: Factor on the local crops' pairs of the DINO loss (DINOv3's Gram and
            high-resolution phases: 0.5; see :class:`~lightning_dino.losses.dino.DINOLoss`).
        koleo_loss_weight: DINOv2's KoLeo term; see :class:`~lightning_dino.losses.koleo.KoLeoTerm`.
        ibot_loss_weight: DINOv2's iBOT term; see :class:`~lightning_dino.losses.ibot.iBOTTerm`.
        gram_loss_weight: DINOv3's Gram anchoring; see
            :class:`~lightning_dino.losses.gram.GramTerm`.
        koleo_group_size: See ``KoLeoTerm``.
        gram_start_step: See ``GramTerm`` (as the other ``gram_*`` arguments).
        gram_update_every: See ``GramTerm``.
        gram_max_updates: See ``GramTerm``.
        gram_remove_negatives: See ``GramTerm``.
        gram_image_size: See ``GramTerm``.
        gram_ramp_steps: See ``GramTerm``.
        gram_teacher_step: See ``GramTerm``.
        gram_teacher_checkpoint: See ``GramTerm``.
        gram_remove_teacher_negatives: See ``GramTerm``.
        gram_image_level: See ``GramTerm``.
        ibot_mask_ratio: See ``iBOTTerm`` (as the other ``ibot_*`` arguments).
        ibot_mask_probability: See ``iBOTTerm``.
        ibot_mask_rule: See ``iBOTTerm``.
        ibot_separate_head: See ``iBOTTerm``.
        ibot_out_dim: See ``iBOTTerm``.
        ibot_bottleneck_dim: See ``iBOTTerm``.
        layerwise_decay: DINOv2's layer-wise learning-rate decay for ViT backbones (0.9 in
            DINOv2; 1.0 = off): block i trains at ``decay ** (n_blocks - i)`` times the lr.
        patch_embed_lr_mult: Extra learning-rate factor of the patch embedding (0.2 in DINOv2).
        momentum_teacher: Teacher EMA momentum at step 0; cosine to ``momentum_teacher_end``.
        momentum_teacher_end: Teacher EMA momentum at the last step (1.0).
        lr: Base learning rate; the peak is ``lr * global_batch / 256`` (``lr_scaling``).
        min_lr: Final learning rate of the cosine decay.
        warmup_epochs: Epochs of linear learning-rate warmup, per step (may be fractional).
        weight_decay: Weight decay at step 0 (decay group only).
        weight_decay_end: Weight decay at the last step (cosine, per step).
        clip_grad: Gradient-norm clip after unscaling; 0 disables.
        clip_mode: ``"per_tensor"`` (DINO) or ``"per_module"`` (DINOv2, DINOv3: one global norm
            each for the backbone and each head).
        adamw_betas: AdamW's betas ((0.9, 0.999); DINOv3's ViT-7B: (0.9, 0.99)).
        lr_scaling: ``"linear_wrt_256"`` (DINO) or ``"sqrt_wrt_1024"`` (DINOv3:
            ``lr * 4 * sqrt(global batch / 1024)``).
        freeze_last_layer: Epochs during which the head's last-layer gradients are dropped (set to
            None, so AdamW applies neither the update nor weight decay).
        freeze_backbone_steps: Optimizer steps during which only the heads train: a warm-up that
            protects pretrained backbone weights from random heads' gradients.
        backbone_warmup_steps: Steps after those over which the backbone's lr rises linearly
            from 0 to the schedule's (0: at once).
        optimizer: ``"adamw"`` (fused where supported) or ``"sgd"`` (momentum 0.9).
        compile: ``torch.compile`` the student and teacher backbones (in place, so checkpoint
            keys do not change; one static graph per crop size).
        activation_checkpointing: Recompute the student's activations block by block in
            backward, for less memory and about a third more compute (timm backbones).
        channels_last: Keep convolutional backbones' weights channels-last (1.2x for the
            quickstart ResNet on a CPU); ViTs are left as they are.
        backbone_dim: Feature width D of an ``nn.Module`` backbone without an integer
            ``num_features`` / ``embed_dim`` that cannot run on a 224 x 224 image.
        monitors: Bring the collapse warning, the images/s log and the crop grid; False leaves
            only the callbacks the method needs.
        start_from: Weights the student and the teacher start from: a checkpoint of this
            package (backbone and heads), an export directory or a weights file of the timm
            backbone (:mod:`~lightning_dino.io.start_weights`); read once, never needed to
            restore the run.

    Examples:
        >>> model = DINO(backbone="resnet18", out_dim=4096)  # the teacher: a copy, moved by EMA
        >>> data = MultiCropDataModule(dataset="folder", data_dir="photos/")
        >>> pl.Trainer(max_epochs=100).fit(model, data)  # doctest: +SKIP
    """

    structural_keys = (
        "out_dim", "hidden_dim", "bottleneck_dim", "n_head_layers", "use_bn_in_head",
        "norm_last_layer", "head_weight_norm", "ibot_separate_head", "ibot_out_dim",
        "ibot_bottleneck_dim",
    )

    def __init__(
        self,
        backbone: str | nn.Module = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        feature_grid: int = 0,
        drop_path_rate: float = 0.1,
        rope_rescale_coords: float = 0.0,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        head_weight_norm: bool = True,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        teacher_temp_per_step: bool = False,
        center_momentum: float = 0.9,
        centering: Literal["center", "sinkhorn_knopp"] = "center",
        local_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.0,
        koleo_group_size: int = 0,
        ibot_loss_weight: float = 0.0,
        gram_loss_weight: float = 0.0,
        gram_start_step: int = 0,
        gram_update_every: int = 0,
        gram_max_updates: int = 0,
        gram_remove_negatives: bool = False,
        gram_image_size: int = 0,
        gram_ramp_steps: int = 0,
        gram_teacher_step: int = -1,
        gram_teacher_checkpoint: str | None = None,
        gram_remove_teacher_negatives: bool = False,
        gram_image_level: bool = True,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
        ibot_mask_rule: Literal["dinov2", "dinov3"] = "dinov2",
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
        clip_mode: Literal["per_tensor", "per_module"] = "per_tensor",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        lr_scaling: Literal["linear_wrt_256", "sqrt_wrt_1024"] = "linear_wrt_256",
        freeze_last_layer: int = 1,
        freeze_backbone_steps: int = 0,
        backbone_warmup_steps: int = 0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        compile: bool = False,
        activation_checkpointing: bool = False,
        channels_last: bool = True,
        backbone_dim: int | None = None,
        monitors: bool = True,
        start_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_arguments()
        self.validate_arguments()
        hp = self.hparams
        enabled = [term for term in TERMS if term.enabled(hp)]
        options = {k: v for term in enabled for k, v in term.network_options(hp).items()}

        def check_backbone(student_backbone: nn.Module, dim: int) -> None:
            for term in enabled:
                term.check_backbone(student_backbone, dim, self)

        build_kwargs, pretrained = split_pretrained(backbone_kwargs)
        self.student, self.teacher = build_student_teacher(
            backbone, head_arguments(hp), drop_path_rate, build_kwargs, feature_grid,
            backbone_dim, channels_last=channels_last, compile=compile,
            activation_checkpointing=activation_checkpointing, check_backbone=check_backbone,
            owner=self, **options,
        )
        self.prepare_start(start_from, pretrained, backbone, feature_grid)
        if rope_rescale_coords:
            use_rope_rescale(self.student.backbone, rope_rescale_coords, self)
        self.loss = DINOLoss(out_dim, student_temp, center_momentum, centering, local_loss_weight)
        self.loss.defer_center_update = True  # applied once per optimizer step
        for term_class in enabled:
            term = term_class.from_hparams(hp, self.teacher)
            self.add_module(term.name, term)  # checkpoint keys <name>.*

    def argument_checks(self) -> list[Check]:
        """The method base's checks, DINO's own, then every term's (on or off)."""
        hp = self.hparams
        rows = [
            (hp.out_dim >= 2, "out_dim", "use at least 2 prototypes (65536 in the paper)"),
            (hp.student_temp > 0, "student_temp", "use a positive temperature (0.1)"),
            (hp.teacher_temp > 0, "teacher_temp", "use a positive temperature (0.04-0.07)"),
            (hp.warmup_teacher_temp > 0, "warmup_teacher_temp", "use a positive temperature"),
            (0 <= hp.center_momentum <= 1, "center_momentum", "use a value in [0, 1] (0.9)"),
            (0 <= hp.momentum_teacher <= 1, "momentum_teacher", "use a value in [0, 1] (0.996)"),
            (0 <= hp.momentum_teacher_end <= 1, "momentum_teacher_end", "use a value in [0, 1]"),
            (hp.centering in ("center", "sinkhorn_knopp"), "centering",
             "use center or sinkhorn_knopp"),
            (hp.freeze_last_layer >= 0, "freeze_last_layer", "use a non-negative epoch count"),
            (hp.freeze_backbone_steps >= 0, "freeze_backbone_steps", "use 0 or more steps"),
            (hp.local_loss_weight >= 0, "local_loss_weight", "use a weight >= 0 (1.0; 0.5)"),
            (hp.rope_rescale_coords == 0 or hp.rope_rescale_coords >= 1, "rope_rescale_coords",
             "use 0 (off) or a factor >= 1 (2 in DINOv3)"),
        ]
        terms = [row for term in TERMS for row in term.argument_checks(hp)]
        return [*super().argument_checks(), *rows, *terms]

    def method_callbacks(self) -> list[Callback]:
        """The teacher EMA, part of the method."""
        return [TeacherEMA(self.hparams.momentum_teacher, self.hparams.momentum_teacher_end)]

    def monitor_types(self) -> list[type[Callback]]:
        """The collapse warning, then the base's monitors."""
        return [CollapseMonitor, *super().monitor_types()]

    def schedule_warnings(self) -> list[str]:
        """The learning-rate warmup's, the temperature warmup's, the freeze's and the terms'."""
        hp = self.hparams
        epochs = -(-self.total_steps // self.steps_per_epoch)
        messages = super().schedule_warnings()
        if hp.warmup_teacher_temp != hp.teacher_temp and hp.warmup_teacher_temp_epochs >= epochs:
            messages.append(
                f"{setting(self, 'warmup_teacher_temp_epochs', hp.warmup_teacher_temp_epochs)} "
                f"covers the whole run ({epochs} epoch(s)): the teacher temperature never reaches "
                f"{setting(self, 'teacher_temp', hp.teacher_temp)}; lower it or train longer"
            )
        if hp.freeze_last_layer >= epochs:
            messages.append(
                f"{setting(self, 'freeze_last_layer', hp.freeze_last_layer)} covers the whole "
                f"run ({epochs} epoch(s)): the head's last layer never trains; use 0 for such a "
                "short run"
            )
        for term in self.terms:
            messages += term.schedule_warnings(self.total_steps, self)
        return messages

    def resume_warnings(self, saved: dict[str, Any]) -> list[str]:
        """What each term's settings meant when the checkpoint was written."""
        return [message for term in TERMS for message in term.resume_warnings(saved, self.hparams)]

    def teacher_temp(self, epoch: int, step: int | None = None) -> float:
        """The teacher temperature: linear warmup then constant, per epoch or per step (DINOv2)."""
        hp = self.hparams
        if hp.teacher_temp_per_step and step is not None:
            warmup_steps = round(hp.warmup_teacher_temp_epochs * self.steps_per_epoch)
            return teacher_temperature(step, hp.teacher_temp, hp.warmup_teacher_temp, warmup_steps)
        return teacher_temperature(
            epoch, hp.teacher_temp, hp.warmup_teacher_temp, hp.warmup_teacher_temp_epochs
        )

    def start_run(self) -> None:
        """A run from step 0: the centres restart at 0."""
        self.loss.reset_center()
        for term in self.terms:
            term.start_run()

    def before_optimizer_step(self) -> None:
        """Last-layer and backbone freezes, then the centres move once per optimizer step."""
        if self.current_epoch < self.hparams.freeze_last_layer:
            drop_gradients(self.student.head.last_layer)
            if hasattr(self.student, "patch_head"):
                drop_gradients(self.student.patch_head.last_layer)
        if self.global_step < self.hparams.freeze_backbone_steps:
            drop_gradients(self.student.backbone)
        self.loss.update_center()
        for term in self.terms:
            term.before_optimizer_step()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Let the loss terms see the EMA teacher before the step (a Gram snapshot when due)."""
        for term in self.terms:
            term.before_batch(self.global_step, self.teacher)

    def compute_step(self, crops: list[Tensor], extra_crops: dict[str, list[Tensor]]) -> StepResult:
        """Teacher targets, student outputs, the DINO loss and the active terms' losses."""
        temp = self.teacher_temp(self.current_epoch, self.global_step)
        terms = [term for term in self.terms if term.active(self.global_step)]
        needs, draw_masks = forward_request(terms)
        outputs = forward_step(self.student, self.teacher, crops, self.hparams.n_global_crops,
                               needs, draw_masks, extra_crops)
        dino_loss = self.loss(outputs.student_out, outputs.teacher_out, temp)
        loss, logged = add_term_losses(dino_loss, terms, outputs, temp, self.global_step)
        scores = PrototypeScores(
            outputs.student_out, outputs.teacher_out, self.loss.center,
            self.hparams.student_temp, temp,
        )
        return StepResult(loss, crops[0].shape[0], {"train/dino_loss": dino_loss, **logged}, scores)
