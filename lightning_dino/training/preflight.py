"""Checks of the model against the data and the run length, before any data is read.

:class:`~lightning_dino.DINO` validates its own arguments when it is built. What it cannot check
alone, because it depends on the data module or on the trainer, is checked here: the crop sizes
against the backbone (a cheap forward of one blank image per crop size), the number of views,
BatchNorm with one image per device, and what the method's loss terms need of the batch
(``model.check_batch_size``). Schedules longer than the run are the method's own warnings
(``schedule_warnings``), once the run length is known.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_dino.setting_names import setting


def check_model_and_data(model: pl.LightningModule, trainer: pl.Trainer) -> None:
    """Raise on model x data settings that cannot train; does nothing without a data module.

    Reads the crop settings from the data module's ``hparams`` (as
    :class:`~lightning_dino.data.MultiCropDataModule` saves them) and its batch size, and runs
    the student backbone in eval mode on a (1, 3, size, size) zero image for each crop size.

    Args:
        model: The method module (on the CPU, before training).
        trainer: The trainer the model is attached to.

    Raises:
        ValueError: The message names the setting
            (:func:`~lightning_dino.setting_names.setting`) and the fix.
    """
    datamodule = trainer.datamodule
    if datamodule is None:
        return
    data: dict[str, Any] = dict(getattr(datamodule, "hparams", {}))
    _check_views(model, data)
    model.check_data(data)
    check_crop_sizes(model, data)
    batch_size = data.get("batch_size", getattr(datamodule, "batch_size", None))
    _check_batch_norm(model, batch_size, trainer)
    if batch_size is not None:
        model.check_batch_size(batch_size)


def check_crop_sizes(model: pl.LightningModule, data: dict[str, Any]) -> None:
    """Run the student backbone on one blank image of each crop size the data settings make.

    Args:
        model: The method module.
        data: ``MultiCropDataModule``'s arguments (``global_crop_size``, ``local_crop_size``,
            ``n_local_crops``, ``crop_size_mix``).

    Raises:
        ValueError: Naming the data setting whose size the backbone cannot take.
    """
    mix = data.get("crop_size_mix")
    rows = mix or [[data.get("global_crop_size"), data.get("local_crop_size")]]
    keys = ("crop_size_mix",) * 2 if mix else ("global_crop_size", "local_crop_size")
    checks = {(keys[0], row[0]) for row in rows}
    if data.get("n_local_crops", 0) > 0:
        checks |= {(keys[1], row[1]) for row in rows}
    for key, size in sorted(checks, key=str):
        if size is not None:
            what = f"{setting('data', key)} ({size} px)" if mix else setting("data", key, size)
            _check_crop_size(model.student.backbone, what, int(size))


def _check_views(model: pl.LightningModule, data: dict[str, Any]) -> None:
    n_global = data.get("n_global_crops")
    if n_global is None:
        return
    if n_global != model.hparams.n_global_crops:
        raise ValueError(
            f"{setting('data', 'n_global_crops', n_global)} but "
            f"{setting(model, 'n_global_crops', model.hparams.n_global_crops)}: the teacher "
            "must see exactly the global crops; set both to the same value (2 in the paper)"
        )
    n_local = data.get("n_local_crops", 0)
    if n_global + n_local < 2:
        raise ValueError(
            f"{setting('data', 'n_local_crops', n_local)} with "
            f"{setting('data', 'n_global_crops', n_global)} gives one view per image, but the "
            f"DINO loss compares different views; use {setting('data', 'n_local_crops')} >= 1 or "
            "2 global crops"
        )


def _check_crop_size(
    backbone: nn.Module,
    what: str,
    size: int | tuple[int, int],
    device: torch.device | None = None,
) -> None:
    """Run the backbone on one blank image of ``size``; raise a readable error naming ``what``."""
    height, width = (size, size) if isinstance(size, int) else size
    was_training = backbone.training
    try:
        # A module call (a sharded backbone's hooks fire), eager: a backbone compiled in place
        # is not compiled for this shape.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            features = backbone.eval()(torch.zeros(1, 3, height, width, device=device))
    except Exception as err:  # timm raises AssertionError, RuntimeError, ValueError...
        raise ValueError(
            f"{what}: the backbone cannot take {height}x{width} crops "
            f"({type(err).__name__}: {err}); {_size_hint(backbone, max(height, width))}"
        ) from err
    finally:
        backbone.train(was_training)
    if features.ndim != 2 or features.shape[0] != 1:
        raise ValueError(
            f"{what}: the backbone returns shape {tuple(features.shape)} for one "
            f"{height}x{width} image instead of (1, D) features; use a backbone without "
            "classifier that pools its features (timm models are built with num_classes=0)"
        )


def _size_hint(backbone: nn.Module, size: int) -> str:
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is None:
        return "use a larger crop size"
    step = int(patch[0] if isinstance(patch, tuple | list) else patch)
    lower, upper = max(step, size // step * step), max(step, math.ceil(size / step) * step)
    options = sorted({lower, upper})
    return (
        f"ViT crops must be a multiple of the patch size {step}, e.g. "
        f"{' or '.join(map(str, options))}"
    )


def _check_batch_norm(
    model: pl.LightningModule, batch_size: int | None, trainer: pl.Trainer
) -> None:
    if batch_size is None or batch_size > 1:
        return
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.student.modules()):
        return
    synced = getattr(trainer.strategy, "_layer_sync", None) is not None
    if synced and trainer.world_size > 1:
        return
    raise ValueError(
        f"{setting('data', 'batch_size', batch_size)}: the student has BatchNorm layers (in "
        f"the backbone or from {setting(model, 'use_bn_in_head')}), whose training statistics "
        f"need several images per device; use {setting('data', 'batch_size')} >= 2 (or, on "
        f"several devices, {setting('trainer', 'sync_batchnorm', True)}), or a backbone without "
        "BatchNorm such as a ViT"
    )


BATCH_FORMATS = (
    "a list of crops [global_1, global_2, local_1, ...], each a (B, C, H, W) tensor, globals "
    "first; a tuple/list (crops, labels); or a dict with the crops under 'crops'"
)


def crops_of(batch: Any) -> list[Tensor]:
    """The list of crop tensors in a training batch, in any of the accepted formats.

    Args:
        batch: ``crops``, ``(crops, labels)`` / ``[crops, labels]``, or ``{"crops": crops, ...}``.

    Returns:
        The crops: (B, C, H, W) tensors, global crops first.

    Raises:
        TypeError: If the batch is none of these, naming what was received.
    """
    if isinstance(batch, dict):
        crops = batch.get("crops")
    elif isinstance(batch, tuple | list) and batch and isinstance(batch[0], tuple | list):
        crops = batch[0]
    else:
        crops = batch
    if isinstance(crops, tuple | list) and crops and all(_is_image_batch(c) for c in crops):
        return list(crops)
    raise TypeError(f"a DINO training batch must be {BATCH_FORMATS}; got {_describe(batch)}")


def extra_crops_of(batch: Any) -> dict[str, list[Tensor]]:
    """The crops a dict batch holds besides the student's: ``{"gram": [...]}`` for ``gram_crops``.

    Args:
        batch: A training batch in any accepted format (only dicts carry extra crops).

    Returns:
        Each ``<name>_crops`` entry other than ``crops`` by ``name`` (empty for other batches).
    """
    if not isinstance(batch, dict):
        return {}
    return {
        key.removesuffix("_crops"): list(value) for key, value in batch.items()
        if key.endswith("_crops") and key != "crops"
    }


def check_first_batch(
    model: pl.LightningModule, crops: list[Tensor]
) -> dict[str, list[int] | None]:
    """Check a run's first batch against the model, whatever data module produced it.

    The same checks as :func:`check_model_and_data` makes on ``MultiCropDataModule`` settings,
    on the batch itself: enough views, one batch size, and every crop size run once through the
    student backbone (a blank image each).

    Args:
        model: The DINO module.
        crops: The first batch's crops.

    Returns:
        The crop sizes the run trains on: ``{"global": [H, W], "local": [h, w] or None}``.

    Raises:
        ValueError: Naming the problem in the batch and the fix.
    """
    n_global = model.hparams.n_global_crops
    if len(crops) < max(2, n_global):
        raise ValueError(
            f"the training batches hold {len(crops)} crop(s) per image, but "
            f"{type(model).__name__} needs the "
            f"{n_global} global crop(s) first and at least 2 views in all ({BATCH_FORMATS})"
        )
    sizes = {tuple(c.shape[-2:]) for c in crops}
    batch_sizes = {c.shape[0] for c in crops}
    if len(batch_sizes) > 1:
        raise ValueError(f"the crops of one batch have different batch sizes {sorted(batch_sizes)}")
    model.check_batch_size(crops[0].shape[0])
    device = next(model.student.backbone.parameters()).device
    for height, width in sorted(sizes):
        _check_crop_size(
            model.student.backbone,
            f"crops of {height}x{width} in your training batches",
            (height, width),
            device,
        )
    return {
        "global": list(crops[0].shape[-2:]),
        "local": list(crops[n_global].shape[-2:]) if len(crops) > n_global else None,
    }


def _is_image_batch(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 4


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, tuple | list):
        inner = ", ".join(_describe(item) for item in list(batch)[:3])
        more = ", ..." if len(batch) > 3 else ""
        return f"a {type(batch).__name__} of {len(batch)} ({inner}{more})"
    return type(batch).__name__
