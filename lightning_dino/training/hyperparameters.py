"""Checks of the ``DINO`` module's own arguments, made when it is built."""

from __future__ import annotations

from typing import Any

from lightning_dino.naming import setting


def validate_hyperparameters(hparams: Any) -> None:
    """Fail fast, before any data is read, on ``DINO`` settings that cannot work.

    Args:
        hparams: The module's hyperparameters.

    Raises:
        ValueError: Naming the setting (:func:`~lightning_dino.naming.setting`) and the fix.
    """
    checks = [
        (hparams.out_dim >= 2, "out_dim", "use at least 2 prototypes (65536 in the paper)"),
        (hparams.student_temp > 0, "student_temp", "use a positive temperature (0.1)"),
        (hparams.teacher_temp > 0, "teacher_temp", "use a positive temperature (0.04-0.07)"),
        (hparams.warmup_teacher_temp > 0, "warmup_teacher_temp", "use a positive temperature"),
        (0 <= hparams.center_momentum <= 1, "center_momentum", "use a value in [0, 1] (0.9)"),
        (0 <= hparams.momentum_teacher <= 1, "momentum_teacher", "use a value in [0, 1] (0.996)"),
        (0 <= hparams.momentum_teacher_end <= 1, "momentum_teacher_end", "use a value in [0, 1]"),
        (hparams.lr > 0, "lr", "use a positive base learning rate (0.0005)"),
        (hparams.min_lr >= 0, "min_lr", "use a non-negative value"),
        (hparams.warmup_epochs >= 0, "warmup_epochs", "use a non-negative number of epochs"),
        (hparams.clip_grad >= 0, "clip_grad", "use 0 to disable clipping or a positive norm"),
        (hparams.koleo_loss_weight >= 0, "koleo_loss_weight", "use 0 (off) or a weight (0.1)"),
        (hparams.ibot_loss_weight >= 0, "ibot_loss_weight", "use 0 (off) or a weight (1.0)"),
        (hparams.gram_loss_weight >= 0, "gram_loss_weight", "use 0 (off) or a weight"),
        (hparams.gram_start_step >= 0, "gram_start_step", "use a step >= 0"),
        (hparams.gram_update_every >= 0, "gram_update_every", "use 0 (never) or a step count"),
        (hparams.gram_max_updates >= 0, "gram_max_updates", "use 0 (no limit) or a count"),
        (hparams.gram_image_size >= 0, "gram_image_size", "use 0 (the crops) or a side"),
        (hparams.ibot_out_dim == 0 or hparams.ibot_out_dim >= 2, "ibot_out_dim", "use 0 or >= 2"),
        (hparams.ibot_bottleneck_dim >= 0, "ibot_bottleneck_dim", "use 0 or a width"),
        (
            0 < hparams.ibot_mask_ratio[0] <= hparams.ibot_mask_ratio[1] < 1,
            "ibot_mask_ratio",
            "use 0 < min <= max < 1 ([0.1, 0.5])",
        ),
        (0 <= hparams.ibot_mask_probability <= 1, "ibot_mask_probability", "use [0, 1] (0.5)"),
        (0 < hparams.layerwise_decay <= 1, "layerwise_decay", "use a value in (0, 1] (0.9)"),
        (hparams.patch_embed_lr_mult > 0, "patch_embed_lr_mult", "use a positive factor (0.2)"),
        (
            hparams.centering in ("center", "sinkhorn_knopp"),
            "centering",
            "use center or sinkhorn_knopp",
        ),
        (hparams.n_global_crops in (1, 2), "n_global_crops", "use 1 or 2 global crops"),
        (hparams.freeze_last_layer >= 0, "freeze_last_layer", "use a non-negative epoch count"),
        (hparams.freeze_backbone_steps >= 0, "freeze_backbone_steps", "use 0 or more steps"),
    ]
    for ok, key, fix in checks:
        if not ok:
            raise ValueError(f"{setting('model', key, hparams[key])} is invalid: {fix}.")
