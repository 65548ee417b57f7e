"""Bring a frozen teacher for distillation: a checkpoint, an export, a timm name or a module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from lightning_dino.io.export import (
    UnreadableCheckpointError,
    default_network,
    load_backbone,
    read_checkpoint,
)
from lightning_dino.io.sharded_checkpoints import is_sharded_checkpoint
from lightning_dino.io.start_weights import split_pretrained
from lightning_dino.networks.backbones import create_timm_backbone
from lightning_dino.networks.distillation import FrozenTeacher
from lightning_dino.networks.head import DINOHead, head_arguments
from lightning_dino.setting_names import setting


def load_teacher(
    teacher: str | Path | nn.Module,
    teacher_kwargs: dict[str, Any] | None = None,
    owner: object = "model",
    patch_head: bool = False,
) -> tuple[FrozenTeacher, dict[str, Any]]:
    """Build the frozen teacher of a distillation run.

    Args:
        teacher: One of

            - a Lightning checkpoint of :class:`~lightning_dino.DINO`: its EMA teacher backbone
              and DINO head (and the loss centre it trained with); of a distillation run: the
              student's EMA backbone;
            - an export directory of ``lightning-dino export`` (loaded with ``load_backbone``);
            - a timm model name, created with ``teacher_kwargs`` (e.g. ``pretrained: true`` and
              ``pretrained_cfg_overlay: {file: weights.safetensors}`` for local weights);
            - an ``nn.Module`` mapping images to (B, D) features (a timm model also gives its
              feature map).
        teacher_kwargs: ``timm.create_model`` arguments for a timm name.
        owner: The module the teacher is for, for the names in messages.
        patch_head: Keep a DINO checkpoint's separate iBOT head in the teacher (for iBOT
            targets); without it the teacher holds its backbone and DINO head only.

    Returns:
        ``(teacher, run)``: the teacher (eval mode, ``requires_grad=False``) and, for a DINO
        checkpoint, what its run trained with: ``head`` (the head's keyword arguments besides
        ``in_dim``), ``teacher_temp`` and ``center`` (the (1, K) centre of its loss, or None),
        ``ibot`` (whether it trained with iBOT), ``patch_head`` (its separate iBOT head's
        arguments, None when the DINO head serves the patches) and ``ibot_center``; for a timm
        teacher whose ``pretrained`` weights are not read yet (a missing local file, timm's
        hub), ``pending_teacher``: the ``teacher_kwargs`` to read them with when a run starts
        (see :func:`~lightning_dino.io.start_weights.split_pretrained`); else an empty dict.

    Raises:
        FileNotFoundError: If ``teacher`` is neither an existing path nor a timm model name.
        ValueError: If the file exists but cannot be read as a checkpoint or an export.
    """
    if isinstance(teacher, nn.Module):
        return FrozenTeacher(teacher), {}
    name = str(teacher)
    path = Path(name).expanduser()
    if not path.exists():
        if timm.is_model(name):
            now, later = split_pretrained(teacher_kwargs)
            run = {} if later is None else {"pending_teacher": later}
            return FrozenTeacher(create_timm_backbone(name, 0.0, now)), run
        raise FileNotFoundError(
            f"{setting(owner, 'teacher', name)}: no such file or directory, and not a timm "
            "model name. Pass a DINO checkpoint (.ckpt), an export directory of `lightning-dino "
            "export`, a timm model name or an nn.Module."
        )
    try:
        export = path.is_dir() and not is_sharded_checkpoint(path)
        if export or path.suffix in (".json", ".safetensors"):
            return FrozenTeacher(load_backbone(path)), {}
        return _from_checkpoint(path, patch_head)
    except (UnreadableCheckpointError, ValueError, FileNotFoundError) as err:
        raise ValueError(f"{setting(owner, 'teacher', name)} cannot be read: {err}") from err


def _from_checkpoint(path: Path, with_patch_head: bool) -> tuple[FrozenTeacher, dict[str, Any]]:
    """The network a checkpoint evaluates, with its DINO head and centre when it has them."""
    ckpt = read_checkpoint(path)
    which = default_network(ckpt)
    backbone = load_backbone(path, which)
    hp = ckpt.get("hyper_parameters") or {}
    state = ckpt["state_dict"]
    prefix = f"{which}.head."
    head_state = {key.removeprefix(prefix): value for key, value in state.items()
                  if key.startswith(prefix)}
    if not head_state or "out_dim" not in hp:  # a network without a DINO head
        return FrozenTeacher(backbone), {}
    head_kwargs = {key: value for key, value in head_arguments(hp).items()
                   if key != "norm_last_layer"}
    head = DINOHead(int(backbone.num_features), **head_kwargs, norm_last_layer=True)
    head.load_state_dict(head_state)
    patch_head, patch_kwargs = _patch_head(state, f"{which}.patch_head.", hp, head_kwargs, backbone)
    center, ibot_center = state.get("loss.center"), state.get("ibot.loss.center")
    return FrozenTeacher(backbone, head, patch_head if with_patch_head else None), {
        "head": head_kwargs,
        "teacher_temp": float(hp.get("teacher_temp", 0.04)),
        "center": None if center is None else center.clone(),
        "ibot": hp.get("ibot_loss_weight", 0) > 0,
        "patch_head": patch_kwargs,
        "ibot_center": None if ibot_center is None else ibot_center.clone(),
    }


def _patch_head(
    state: dict[str, Any],
    prefix: str,
    hp: dict[str, Any],
    head_kwargs: dict[str, Any],
    backbone: nn.Module,
) -> tuple[DINOHead | None, dict[str, Any] | None]:
    """The separate iBOT head of a DINO teacher (and its arguments), or (None, None) if shared."""
    patch_state = {key.removeprefix(prefix): value for key, value in state.items()
                   if key.startswith(prefix)}
    if not patch_state:
        return None, None
    kwargs = {**head_kwargs, "out_dim": hp.get("ibot_out_dim") or hp["out_dim"],
              "bottleneck_dim": hp.get("ibot_bottleneck_dim") or hp["bottleneck_dim"]}
    patch_head = DINOHead(int(backbone.num_features), **kwargs, norm_last_layer=True)
    patch_head.load_state_dict(patch_state)
    return patch_head, kwargs
