"""A third method on the method base, written only in the tests: iBOT alone.

Masked-patch prediction against an EMA teacher, with no image-level loss: the student sees the
global crops with blocks of patches replaced by a mask token and predicts the teacher's
prototype distribution at those patches. Everything else (batches, checks, callbacks,
checkpoints, resume, optimisation, schedules, logging, export) is the method base's.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.losses.term import forward_request
from lightning_dino.networks.backbones import build_student_teacher
from lightning_dino.networks.forward import forward_step
from lightning_dino.networks.head import head_arguments
from lightning_dino.training.ema import TeacherEMA
from lightning_dino.training.method import Method
from lightning_dino.training.step_logging import StepResult


class iBOTOnly(Method):
    """iBOT's masked-patch loss alone, with a ViT student and its EMA teacher.

    Args:
        backbone: A timm ViT name.
        backbone_kwargs: Extra ``timm.create_model`` arguments.
        out_dim, hidden_dim, bottleneck_dim: The patch head's sizes.
        student_temp, teacher_temp, center_momentum: The iBOT loss's temperatures and centre.
        ibot_mask_ratio, ibot_mask_probability: How the student's global crops are masked.
        momentum_teacher: EMA momentum of the teacher at step 0 (cosine to 1).
        The rest: the method base's optimisation arguments (see ``DINO``).
    """

    structural_keys = ("out_dim", "hidden_dim", "bottleneck_dim")

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 1.0,
        momentum_teacher: float = 0.996,
        n_global_crops: int = 2,
        lr: float = 0.0005,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        layerwise_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
        optimizer: str = "adamw",
        monitors: bool = True,
    ) -> None:
        super().__init__()
        self.save_arguments()
        self.validate_arguments()
        self.student, self.teacher = build_student_teacher(
            backbone, head_arguments(self.hparams), 0.0, backbone_kwargs, mask_token=True,
            check_backbone=lambda net, dim: iBOTTerm.check_backbone(net, dim, self),
        )
        self.ibot = iBOTTerm(1.0, out_dim, student_temp, center_momentum, "center",
                             ibot_mask_ratio, ibot_mask_probability)

    def method_callbacks(self) -> list[Callback]:
        return [TeacherEMA(self.hparams.momentum_teacher, 1.0)]

    def start_run(self) -> None:
        self.ibot.start_run()

    def before_optimizer_step(self) -> None:
        self.ibot.before_optimizer_step()

    def compute_step(self, crops: list[Tensor], extra_crops: dict[str, list[Tensor]]) -> StepResult:
        n_global = self.hparams.n_global_crops
        needs, draw_masks = forward_request([self.ibot])
        outputs = forward_step(self.student, self.teacher, crops[:n_global], n_global,
                               needs, draw_masks)
        loss = self.ibot(outputs, self.hparams.teacher_temp)
        return StepResult(loss, crops[0].shape[0], {"train/ibot_loss": loss})
