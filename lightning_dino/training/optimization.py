"""DINO's optimisation: parameter groups (DINOv2's layer-wise lr decay), clipping, schedules.

Reference: ``get_params_groups`` and ``clip_gradients`` in facebookresearch/dino ``utils.py``;
``get_params_groups_with_decay`` in facebookresearch/dinov2 ``dinov2/utils/param_groups.py``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_dino.networks.sharding import local
from lightning_dino.setting_names import setting
from lightning_dino.training.schedules import (
    StepScheduler,
    cosine_schedule,
    global_batch_size,
    run_length,
)


def parameter_groups(
    module: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    split_backbone: bool = False,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a weight-decay group and a no-decay group.

    As in the reference: biases and every 1-D parameter (norm weights) get no weight decay; all
    other trainable parameters (``cls_token`` and ``pos_embed`` included) do.

    With ``layerwise_decay`` < 1 (DINOv2's layer-wise learning-rate decay, for ViT backbones
    with ``blocks``), each parameter's learning rate is scaled by
    ``layerwise_decay ** (n_blocks + 1 - layer)``: layer 0 for the embeddings (patch embedding,
    position embedding, class and register tokens), ``i + 1`` for block ``i``, ``n_blocks + 1``
    for everything else (final norm, head); patch-embedding parameters also by
    ``patch_embed_lr_mult``. Parameters with the same scale share a group, whose ``lr_scale``
    :class:`~lightning_dino.training.schedules.StepScheduler` applies.

    Args:
        module: The network whose trainable parameters are grouped (``backbone`` + ``head``).
        layerwise_decay: Per-layer learning-rate decay; 1.0 (default) disables it.
        patch_embed_lr_mult: Extra learning-rate factor of the patch embedding (0.2 in DINOv2).
        split_backbone: Keep the backbone's parameters in groups of their own (``backbone:
            True``), for a learning rate of its own (a warm-up after a frozen start).

    Returns:
        Groups with ``params``, ``name``, ``lr_scale``, ``backbone`` and ``weight_decay`` (0.0
        for the no-decay groups). Without layer-wise scaling and splitting exactly two:
        ``"decay"`` and ``"no_decay"``. In a sharded module, the parameters no shard holds (a
        mask token) form groups of their own (a fused optimizer step takes one kind of tensor).
    """
    n_blocks = len(getattr(getattr(module, "backbone", module), "blocks", []))
    sharded = any(isinstance(p, DTensor) for p in module.parameters())
    groups: dict[tuple[bool, float, bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (name.endswith(".bias") or param.ndim == 1)
        scale = layerwise_lr_scale(name, n_blocks, layerwise_decay, patch_embed_lr_mult)
        in_backbone = split_backbone and name.startswith("backbone.")
        whole = sharded and not isinstance(param, DTensor)  # a fused step takes one kind
        groups.setdefault((decays, scale, in_backbone, whole), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1], item[0][2:]))
    single_scale = len({key[1] for key in groups}) <= 1
    return [
        {
            "params": params,
            "name": ("decay" if decays else "no_decay") + ("" if single_scale else f"/{scale:.4g}")
            + ("/backbone" if in_backbone else "") + ("/unsharded" if whole else ""),
            "lr_scale": scale,
            "backbone": in_backbone,
            "apply_weight_decay": decays,
            **({} if decays else {"weight_decay": 0.0}),
        }
        for (decays, scale, in_backbone, whole), params in ordered
    ]


def layerwise_lr_scale(
    name: str, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float = 1.0
) -> float:
    """The learning-rate factor of parameter ``name`` of a student (``backbone.*`` / ``head.*``).

    Args:
        name: The parameter's name in the student network.
        n_blocks: Number of transformer blocks of the backbone (0: no layer-wise scaling).
        layerwise_decay: Per-layer decay factor (DINOv2: 0.9).
        patch_embed_lr_mult: Extra factor of the patch embedding.

    Returns:
        ``layerwise_decay ** (n_blocks + 1 - layer)`` times the patch-embedding factor.
    """
    layer = n_blocks + 1
    if n_blocks and name == "mask_token":  # an embedding, as in DINOv2
        layer = 0
    elif n_blocks and name.startswith("backbone."):
        inner = name.removeprefix("backbone.")
        if inner.split(".")[0] in ("pos_embed", "patch_embed", "cls_token", "reg_token"):
            layer = 0
        elif inner.startswith("blocks."):
            layer = int(inner.split(".")[1]) + 1
    scale = layerwise_decay ** (n_blocks + 1 - layer)
    if "patch_embed" in name:
        scale *= patch_embed_lr_mult
    return scale


@torch.no_grad()
def clip_gradients_per_tensor(params: list[nn.Parameter], max_norm: float) -> None:
    """Clip each parameter's gradient to L2 norm ``max_norm`` independently (DINO's clip).

    Not a global-norm clip: every tensor gets its own factor ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        params: Parameters whose ``.grad`` (when not None) is clipped in place.
        max_norm: Largest allowed L2 norm per tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = full_norms(grads)
    factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_([local(g) for g in grads], factors)


def full_norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor; of a sharded one (``DTensor``), its full tensor's.

    Sharded tensors' norms come from one all-reduce of the local squared norms.
    """
    norms = list(torch._foreach_norm([local(t) for t in tensors]))
    sharded = [i for i, t in enumerate(tensors) if isinstance(t, DTensor)]
    if sharded:
        squares = torch.stack([norms[i] for i in sharded]).float() ** 2
        torch.distributed.all_reduce(squares, group=tensors[sharded[0]].device_mesh.get_group())
        for i, total in zip(sharded, squares.sqrt().to(norms[0].dtype), strict=True):
            norms[i] = total
    return norms


def unscale_fp16_gradients(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``16-mixed`` gradients that Lightning left scaled for a fused optimizer.

    Lightning unscales before ``on_before_optimizer_step`` except for optimizers that unscale in
    their own ``step()`` (fused AdamW): clipping must see true gradients, so unscale here; the
    scaler's ``step()`` then passes no scale to the fused kernel and still skips steps with
    infinite gradients.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)


def build_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    device: torch.device,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer over parameter groups; lr and weight decay are set by the schedules.

    Args:
        groups: Parameter groups (:func:`parameter_groups`).
        name: ``"adamw"`` (fused on CUDA and CPU) or ``"sgd"`` (momentum 0.9).
        device: Where the parameters are.
        betas: AdamW's (beta1, beta2): torch's and DINO's (0.9, 0.999); DINOv3's ViT-7B
            configs use (0.9, 0.99).

    Returns:
        The optimizer, at lr 0 until the first schedule step.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(
        groups, lr=0.0, betas=tuple(betas), fused=device.type in ("cuda", "cpu")
    )


def lr_scale(global_batch: int, rule: str = "linear_wrt_256") -> float:
    """The factor from the base learning rate to the peak for a global batch.

    Args:
        global_batch: Images per optimizer step over all devices.
        rule: ``"linear_wrt_256"`` (DINO's ``main_dino.py``): ``batch / 256``;
            ``"sqrt_wrt_1024"`` (DINOv3's ``optim.scaling_rule``, ``dinov3/train/train.py``):
            ``4 * sqrt(batch / 1024)``.

    Returns:
        The factor.
    """
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch / 1024.0)
    return global_batch / 256.0


@torch.no_grad()
def clip_gradients_per_module(modules: list[list[nn.Parameter]], max_norm: float) -> None:
    """Clip each group's gradients to a global L2 norm ``max_norm`` (DINOv3's clip).

    DINOv3 calls ``clip_grad_norm_`` on the backbone, the DINO head and the iBOT head separately
    (``dinov3/train/train.py``): one norm over all the tensors of a submodule.

    Args:
        modules: The parameters of each submodule.
        max_norm: Largest allowed global norm per submodule.
    """
    for params in modules:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # clip_grad_norm_'s formula, on full norms when sharded
            total = torch.stack([n.float() for n in full_norms(grads)]).norm()
            factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_([local(g) for g in grads], factor)


def student_submodules(student: nn.Module) -> list[list[nn.Parameter]]:
    """The student's parameters by submodule, for :func:`clip_gradients_per_module`.

    One list per direct child (``backbone``, ``head``, ``patch_head``...); parameters of the
    student itself (an iBOT ``mask_token``) go with the backbone, where DINOv3 keeps them.
    """
    groups = {name: list(child.parameters()) for name, child in student.named_children()}
    own = [p for name, p in student.named_parameters() if "." not in name]
    if own:
        groups.setdefault("backbone", []).extend(own)
    return [params for params in groups.values() if params]


def drop_gradients(module: nn.Module) -> None:
    """Set every gradient of ``module`` to None, so the optimizer skips it entirely this step.

    AdamW then applies neither the update nor weight decay, and its moments do not move: the
    reference's way of freezing the last layer in the first epoch.
    """
    for param in module.parameters():
        param.grad = None


class StudentOptimization:
    """How a self-distillation module optimises its ``student``, for LightningModules to inherit.

    AdamW (or SGD) over the student only, with decay / no-decay groups (and DINOv2's layer-wise
    decay); the learning rate warms up linearly over ``warmup_epochs`` and decays by a cosine to
    ``min_lr``; the weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end``;
    all per optimizer step, as pure functions of the step (resuming continues them exactly). The
    peak lr is ``lr * global batch / 256`` (or DINOv3's rule, ``lr_scaling``). Gradients are
    clipped after unscaling, per tensor (or per submodule, ``clip_mode``).

    The inheriting module has a ``student`` and these hyperparameters: ``lr``, ``min_lr``,
    ``warmup_epochs``, ``weight_decay``, ``weight_decay_end``, ``optimizer``,
    ``layerwise_decay``, ``patch_embed_lr_mult`` and ``clip_grad``; it calls
    :meth:`start_schedules` in ``on_train_start`` and :meth:`clip_student_gradients` in
    ``on_before_optimizer_step``.
    """

    total_steps: int = 1
    steps_per_epoch: int = 1
    peak_lr: float = 0.0

    def start_schedules(self) -> None:
        """Fix the run length and the peak lr for the run starting (or resuming) now.

        The run is the Trainer's: a Trainer that resumes or fits again after ``max_epochs`` was
        raised continues its step count, and every schedule continues from that step over the
        new run length. Warns about schedules longer than the run.
        """
        self.total_steps, self.steps_per_epoch = run_length(self.trainer)
        rule = self.hparams.get("lr_scaling", "linear_wrt_256")
        self.peak_lr = self.hparams.lr * lr_scale(self.global_batch_size(), rule)
        for message in self.schedule_warnings():
            rank_zero_warn(message)
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, StepScheduler):
            scheduler.sync(self.global_step)

    def schedule_warnings(self) -> list[str]:
        """Messages for schedules that do not fit in the run (once its length is known).

        Here a learning-rate warmup at least as long as the run; a method adds its own.
        """
        warmup_epochs = self.hparams.warmup_epochs
        warmup_steps = round(warmup_epochs * self.steps_per_epoch)
        if warmup_epochs <= 0 or warmup_steps < self.total_steps:
            return []
        return [
            f"{setting(self, 'warmup_epochs', warmup_epochs)} is {warmup_steps} steps, as long "
            f"as the whole run ({self.total_steps} steps): the learning rate never reaches its "
            f"peak {self.peak_lr:.3g}; use a shorter warmup (the reference warms up for 10 of "
            "100 epochs) or train longer"
        ]

    def learning_rate(self, step: int) -> float:
        """Learning rate at optimizer step ``step``: linear warmup, then cosine to ``min_lr``."""
        return cosine_schedule(
            step,
            self.total_steps,
            start=self.peak_lr,
            end=self.hparams.min_lr,
            warmup_steps=round(self.hparams.warmup_epochs * self.steps_per_epoch),
        )

    def backbone_lr_factor(self, step: int) -> float:
        """The backbone's learning-rate factor: 0 while frozen, then a linear warm-up to 1.

        ``freeze_backbone_steps`` then ``backbone_warmup_steps`` (a pretrained backbone
        continued with new heads); 1 without them.
        """
        since = step - self.hparams.get("freeze_backbone_steps", 0)
        ramp = self.hparams.get("backbone_warmup_steps", 0)
        if since < 0:
            return 0.0
        return 1.0 if ramp <= 0 else min(1.0, (since + 1) / ramp)

    def weight_decay(self, step: int) -> float:
        """Weight decay at step ``step``: cosine from ``weight_decay`` to ``weight_decay_end``."""
        return cosine_schedule(
            step, self.total_steps, self.hparams.weight_decay, self.hparams.weight_decay_end
        )

    def global_batch_size(self) -> int:
        """Per-device batch x devices x gradient accumulation, the batch the lr is scaled by."""
        return global_batch_size(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over the student's parameter groups and its per-step schedules.

        The learning-rate and weight-decay schedules come as a :class:`StepScheduler` that
        Lightning steps after every optimizer step (``LearningRateMonitor`` logs what each step
        used); :meth:`start_schedules` sets them for the step the run starts at.
        """
        hp = self.hparams
        split = hp.get("backbone_warmup_steps", 0) > 0
        groups = parameter_groups(self.student, hp.layerwise_decay, hp.patch_embed_lr_mult, split)
        betas = tuple(hp.get("adamw_betas", (0.9, 0.999)))
        optimizer = build_optimizer(groups, hp.optimizer, self.device, betas)
        scheduler = StepScheduler(
            optimizer, self.learning_rate, self.weight_decay, self.backbone_lr_factor
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def clip_student_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the student's gradients to ``clip_grad`` (after unscaling).

        Per tensor (``clip_mode: per_tensor``, DINO's) or one global norm per submodule
        (``per_module``, DINOv2's and DINOv3's).
        """
        if self.hparams.clip_grad <= 0:
            return
        unscale_fp16_gradients(self.trainer, optimizer)
        if self.hparams.get("clip_mode", "per_tensor") == "per_module":
            clip_gradients_per_module(student_submodules(self.student), self.hparams.clip_grad)
        else:
            clip_gradients_per_tensor(list(self.student.parameters()), self.hparams.clip_grad)
