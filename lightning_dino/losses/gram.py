"""Gram anchoring (DINOv3): the student's patch similarities held close to an earlier teacher's.

Long runs keep improving global features while patch features get noisy; anchoring the
pairwise similarity structure of the patches to an earlier, cleaner teacher keeps them clean.

Reference: Siméoni et al., *DINOv3*, 2025 (arXiv 2508.10104), section 4; ``GramLoss`` of
facebookresearch/dinov3 ``dinov3/loss/gram_loss.py``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.term import Check, LossTerm
from lightning_dino.networks.backbones import MultiCropNetwork, is_vit
from lightning_dino.networks.forward import GRAM_CROPS, TOKENS, StepOutputs
from lightning_dino.networks.sharding import load_full_state_
from lightning_dino.networks.tokens import check_token_backbone, token_forward
from lightning_dino.setting_names import setting


class GramLoss(nn.Module):
    """Mean squared error between the patch Gram matrices of the student and the Gram teacher.

    The patch features are L2-normalised and their pairwise cosine similarities ``X X^T``
    compared: per image, (N, N) each (``image_level``, DINOv3's Gram phase), or over all the
    patches of the batch at once, one (B N, B N) matrix (DINOv3's ``img_level: false``). Computed
    in fp32; the mean over all matrix entries (``dinov3/loss/gram_loss.py``).

    Args:
        remove_negatives: Set negative similarities to 0 in both matrices first (the default of
            DINOv3's ``GramLoss`` class). False (the default here) keeps them: both shipped
            DINOv3 training configs set ``remove_neg: false``, anchoring dissimilar patches too.
        remove_teacher_negatives: Set the teacher's negative similarities to 0 and leave the
            student's (DINOv3's ``remove_only_teacher_neg``); not with ``remove_negatives``.
        image_level: One Gram matrix per image (True) or one for the whole batch (False).

    Examples:
        >>> loss = GramLoss()(torch.randn(2, 16, 8), torch.randn(2, 16, 8))
    """

    def __init__(
        self,
        remove_negatives: bool = False,
        remove_teacher_negatives: bool = False,
        image_level: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("remove_negatives", remove_negatives),
                            ("remove_teacher_negatives", remove_teacher_negatives),
                            ("image_level", image_level)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, not {value!r}")
        if remove_negatives and remove_teacher_negatives:
            raise ValueError("remove_negatives and remove_teacher_negatives exclude each other")
        self.remove_negatives = remove_negatives
        self.remove_teacher_negatives = remove_teacher_negatives
        self.image_level = image_level

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        """The loss of a batch.

        Args:
            student_patches: Student patch features (B, N, D).
            teacher_patches: Gram teacher patch features at the same positions (B, N, D').

        Returns:
            Scalar fp32 loss: the mean over the matrix entries of the squared differences.
        """
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(
                "student and teacher patches must be (B, N, D) with the same B and N, got "
                f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
            )
        with full_precision(student_patches.device):
            s = F.normalize(student_patches.float(), dim=-1)
            t = F.normalize(teacher_patches.detach().float(), dim=-1)
            if not self.image_level:  # every patch of the batch against every other
                s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
            student_sim, teacher_sim = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
            if self.remove_negatives:
                student_sim, teacher_sim = student_sim.clamp(min=0), teacher_sim.clamp(min=0)
            elif self.remove_teacher_negatives:
                teacher_sim = teacher_sim.clamp(min=0)
            return F.mse_loss(student_sim, teacher_sim)


class GramTerm(LossTerm):
    """DINOv3's Gram anchoring term of :class:`~lightning_dino.DINO`.

    The Gram teacher is a frozen copy of the EMA teacher's backbone (or of a given checkpoint's),
    refreshed every ``update_every`` steps after ``start_step`` (at most ``max_updates`` times);
    from ``start_step`` on, :class:`GramLoss` holds the student's patch similarities of the global
    crops close to the Gram teacher's, with a weight that ramps up over ``ramp_steps``. The Gram
    teacher sees the data module's Gram crops when it makes them (``--data.gram_crop_size``: the
    same boxes, undistorted, at their own size, as DINOv3), else the student's global crops
    (resized to ``image_size`` when set); its patch features are resized to the student's grid
    (bicubic, no antialias: ``global_teacher_resize_method`` of DINOv3's configs).

    Arguments of :class:`~lightning_dino.DINO` (``--model.*``), each the argument below without
    its ``gram_`` prefix:

    - ``gram_loss_weight``: the weight (0 = off). Needs a ViT backbone (patch tokens).
    - ``gram_start_step``: the optimizer step at which the loss starts (DINOv3 starts late in a
      long run); a start at or past the run's end warns.
    - ``gram_ramp_steps``: steps over which the weight rises from 0 to ``gram_loss_weight``
      (a half cosine, DINOv3's Gram-phase schedule: 1000); 0: the full weight at once.
    - ``gram_teacher_step``: the step at which the EMA teacher is copied as the first Gram
      teacher (DINOv3's ``it_load_ema_teacher``); -1: at ``gram_start_step``.
    - ``gram_teacher_checkpoint``: a checkpoint of this package whose EMA teacher backbone is the
      first Gram teacher (DINOv3's ``gram.ckpt``), read once when a run starts from step 0.
    - ``gram_update_every``, ``gram_max_updates``: refreshes after the start (0: never; 0: no
      limit, DINOv3's ``max_updates``).
    - ``gram_remove_negatives``, ``gram_remove_teacher_negatives``, ``gram_image_level``: see
      :class:`GramLoss` (DINOv3's ``remove_neg``, ``remove_only_teacher_neg``, ``img_level``).
    - ``gram_image_size``: without Gram crops from the data, the side the student's global
      crops are resized to for the Gram teacher (0: as they are).

    Args:
        weight: The term's weight (after the ramp).
        teacher_backbone: The EMA teacher's backbone (a timm ViT); copied, not shared.
        start_step: Optimizer step at which the term starts.
        update_every: Steps between refreshes after the start; 0 keeps the first snapshot.
        max_updates: At most this many refreshes after the first snapshot; 0 = no limit.
        remove_negatives: See :class:`GramLoss`.
        image_size: Side of the Gram teacher's input when the data makes no Gram crops (bicubic
            resize of the global crops); 0 feeds it the student's global crops as they are.
        ramp_steps: Steps of the weight's half-cosine ramp from 0.
        teacher_step: Step of the first copy of the EMA teacher; -1: ``start_step``.
        teacher_checkpoint: A checkpoint whose EMA teacher backbone is the first Gram teacher.
        remove_teacher_negatives: See :class:`GramLoss`.
        image_level: See :class:`GramLoss`.

    Raises:
        ValueError: If the backbone is not a ViT (no patch tokens).
    """

    name = "gram"
    needs = frozenset({TOKENS, GRAM_CROPS})

    def __init__(
        self,
        weight: float,
        teacher_backbone: nn.Module,
        start_step: int = 0,
        update_every: int = 0,
        max_updates: int = 0,
        remove_negatives: bool = False,
        image_size: int = 0,
        ramp_steps: int = 0,
        teacher_step: int = -1,
        teacher_checkpoint: str | None = None,
        remove_teacher_negatives: bool = False,
        image_level: bool = True,
    ) -> None:
        super().__init__(weight)
        if not is_vit(teacher_backbone):
            raise ValueError("GramTerm needs a ViT teacher backbone (patch tokens)")
        self.teacher = copy.deepcopy(teacher_backbone).requires_grad_(False)
        self.loss = GramLoss(remove_negatives, remove_teacher_negatives, image_level)
        self.start_step = start_step
        self.update_every = update_every
        self.max_updates = max_updates
        self.image_size = image_size
        self.ramp_steps = ramp_steps
        self.teacher_step = start_step if teacher_step < 0 else teacher_step
        self.teacher_checkpoint = teacher_checkpoint

    @classmethod
    def argument_checks(cls, hparams: Any) -> list[Check]:
        """The weight, start, ramp, first teacher, refreshes, and the teacher's input."""
        return [
            *super().argument_checks(hparams),
            (hparams.gram_start_step >= 0, "gram_start_step", "use a step >= 0"),
            (hparams.gram_update_every >= 0, "gram_update_every", "use 0 (never) or a step count"),
            (hparams.gram_max_updates >= 0, "gram_max_updates", "use 0 (no limit) or a count"),
            (hparams.gram_image_size >= 0, "gram_image_size", "use 0 (the crops) or a side"),
            (hparams.get("gram_ramp_steps", 0) >= 0, "gram_ramp_steps", "use 0 or a step count"),
            (hparams.get("gram_teacher_step", -1) >= -1, "gram_teacher_step",
             "use -1 (at gram_start_step) or a step"),
            (not (hparams.gram_remove_negatives and hparams.get("gram_remove_teacher_negatives")),
             "gram_remove_teacher_negatives", "use it or gram_remove_negatives, not both"),
        ]

    @classmethod
    def check_backbone(cls, backbone: nn.Module, feature_dim: int, owner: object) -> None:
        """A timm ViT whose tokens the token forward reads: the loss compares patch tokens."""
        check_token_backbone(backbone, owner, cls.weight_key())

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> GramTerm:
        """The term with its Gram teacher copied from the EMA teacher's backbone."""
        return cls(
            hparams.gram_loss_weight,
            teacher.backbone,
            hparams.gram_start_step,
            hparams.gram_update_every,
            hparams.gram_max_updates,
            hparams.gram_remove_negatives,
            hparams.gram_image_size,
            hparams.get("gram_ramp_steps", 0),
            hparams.get("gram_teacher_step", -1),
            hparams.get("gram_teacher_checkpoint"),
            hparams.get("gram_remove_teacher_negatives", False),
            hparams.get("gram_image_level", True),
        )

    @classmethod
    def resume_warnings(cls, saved: dict[str, Any], hparams: Any) -> list[str]:
        """lightning_dino 0.1 zeroed negative similarities; a run resumed today anchors them."""
        trained_0_1 = saved.get("gram_loss_weight", 0) > 0 and "gram_remove_negatives" not in saved
        if not trained_0_1 or hparams.get("gram_remove_negatives", True):
            return []
        return [
            "this checkpoint was trained with Gram anchoring by lightning_dino 0.1, which zeroed "
            "negative patch similarities; this run anchors them (today's default, as DINOv3's "
            f"configs); pass {setting('model', 'gram_remove_negatives', True)} to continue as "
            "it was trained"
        ]

    def check_data(self, data: dict[str, Any], owner: object) -> None:
        """The Gram teacher's input comes from the data's Gram crops or from ``image_size``."""
        if data.get("gram_crop_size") and self.image_size:
            raise ValueError(
                f"{setting('data', 'gram_crop_size', data['gram_crop_size'])} gives the Gram "
                f"teacher its own crops, and {setting(owner, 'gram_image_size', self.image_size)} "
                f"would resize the student's instead; use one "
                f"({setting(owner, 'gram_image_size', 0)} with Gram crops, as DINOv3)"
            )

    def schedule_warnings(self, total_steps: int, owner: object) -> list[str]:
        """A start step at or past the run's end: the run would train without the term."""
        if self.start_step < total_steps:
            return []
        return [
            f"{setting(owner, 'gram_start_step', self.start_step)} is at or past the run's last "
            f"step ({total_steps} steps): the run trains without Gram anchoring; start it earlier "
            "or train longer"
        ]

    def active(self, step: int) -> bool:
        """From ``start_step`` on."""
        return step >= self.start_step

    def weight_at(self, step: int) -> float:
        """0 before ``start_step``, a half-cosine ramp over ``ramp_steps``, then ``weight``.

        DINOv3's ``linear_warmup_cosine_decay`` from 0 to the weight over n steps:
        ``weight * (1 - cos(pi * j / (n - 1))) / 2`` at the ramp's step j.
        """
        since = step - self.start_step
        if since < 0:
            return 0.0
        if self.ramp_steps < 2 or since >= self.ramp_steps:
            return self.weight
        return self.weight * (1.0 - math.cos(math.pi * since / (self.ramp_steps - 1))) / 2.0

    def networks(self) -> list[nn.Module]:
        """The Gram teacher, sharded like the EMA teacher it copies."""
        return [self.teacher]

    def snapshot_due(self, step: int) -> bool:
        """Whether the EMA teacher is copied into the Gram teacher before optimizer step ``step``.

        At ``teacher_step`` (unless a checkpoint gave the first Gram teacher), then every
        ``update_every`` steps after ``start_step``, at most ``max_updates`` times.
        """
        if step == self.teacher_step and self.teacher_checkpoint is None:
            return True
        since = step - self.start_step
        every = self.update_every
        if every <= 0 or since <= 0 or since % every:
            return False
        return self.max_updates <= 0 or since // every <= self.max_updates

    def start_run(self) -> None:
        """A run from step 0 with a Gram teacher checkpoint: read its EMA teacher backbone."""
        if self.teacher_checkpoint is not None:
            load_gram_teacher(self.teacher, self.teacher_checkpoint)

    def before_batch(self, step: int, teacher: MultiCropNetwork) -> None:
        """Copy the EMA teacher's backbone into the Gram teacher when a copy is due."""
        if self.snapshot_due(step):
            self.teacher.load_state_dict(teacher.backbone.state_dict())

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """Gram loss of the student's global patch tokens against the Gram teacher's."""
        student = torch.cat(outputs.crops[: outputs.n_global])
        grid = self.teacher.patch_embed.dynamic_feat_size(tuple(student.shape[-2:]))
        gram_crops = outputs.extra_crops.get("gram")
        if gram_crops is not None:
            images = torch.cat(gram_crops)
        elif self.image_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(student, size=size, mode="bicubic", align_corners=False)
        else:
            images = student
        with torch.no_grad():
            anchors = token_forward(self.teacher, images)[1][:, self.teacher.num_prefix_tokens :]
            anchors = resize_patch_grid(anchors, images.shape[-2:], self.teacher, grid)
        return self.loss(outputs.patch_tokens, anchors)


def load_gram_teacher(backbone: nn.Module, checkpoint: str) -> None:
    """Load a checkpoint's EMA teacher backbone (``teacher.backbone.*``) into ``backbone``.

    Args:
        backbone: The Gram teacher.
        checkpoint: A checkpoint of this package (``.ckpt``) with the same backbone architecture.

    Raises:
        FileNotFoundError: If the file does not exist, naming the option.
        ValueError: If it holds no teacher backbone of this architecture.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{setting('model', 'gram_teacher_checkpoint', checkpoint)}: no such file; the "
            "first Gram teacher is read from it when a run starts"
        )
    state = torch.load(path, weights_only=True, map_location="cpu")
    prefix = "teacher.backbone."
    weights = {k[len(prefix):]: v for k, v in state.get("state_dict", {}).items()
               if k.startswith(prefix)}
    try:
        load_full_state_(backbone, weights)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"{setting('model', 'gram_teacher_checkpoint', checkpoint)} holds no EMA teacher "
            f"backbone of this run's architecture ({err})"
        ) from err


def resize_patch_grid(
    tokens: Tensor, image_size: Any, vit: nn.Module, grid: tuple[int, int]
) -> Tensor:
    """Resize a ViT's patch tokens to another patch grid (bicubic, no antialias, as DINOv3).

    Args:
        tokens: Patch tokens (B, N, D) of images of ``image_size`` (H, W).
        image_size: The images' (H, W).
        vit: The timm ViT that made them (its patch grid for ``image_size``).
        grid: The (rows, columns) to resize to.

    Returns:
        Tokens (B, rows * columns, D).
    """
    rows, columns = vit.patch_embed.dynamic_feat_size(tuple(image_size))
    batch, _, dim = tokens.shape
    if (rows, columns) == tuple(grid):
        return tokens
    maps = tokens.transpose(1, 2).reshape(batch, dim, rows, columns)
    maps = F.interpolate(maps.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)
