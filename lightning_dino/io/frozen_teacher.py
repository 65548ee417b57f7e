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
from lightning_dino.networks.backbones import create_timm_backbone
from lightning_dino.networks.distillation import FrozenTeacher
from lightning_dino.networks.head import DINOHead, head_arguments
from lightning_dino.setting_names import setting


def load_teacher(
    teacher: str | Path | nn.Module,
    teacher_kwargs: dict[str, Any] | None = None,
    owner: object = "model",
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

    Returns:
        ``(teacher, run)``: the teacher (eval mode, ``requires_grad=False``) and, for a DINO
        checkpoint, what its run trained with: ``head`` (the head's keyword arguments besides
        ``in_dim``), ``teacher_temp`` and ``center`` (the (1, K) centre of its loss, or None);
        an empty dict for a teacher without a head.

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
            return FrozenTeacher(create_timm_backbone(name, 0.0, teacher_kwargs)), {}
        raise FileNotFoundError(
            f"{setting(owner, 'teacher', name)}: no such file or directory, and not a timm "
            "model name. Pass a DINO checkpoint (.ckpt), an export directory of `lightning-dino "
            "export`, a timm model name or an nn.Module."
        )
    try:
        if path.is_dir() or path.suffix in (".json", ".safetensors"):
            return FrozenTeacher(load_backbone(path)), {}
        return _from_checkpoint(path)
    except (UnreadableCheckpointError, ValueError, FileNotFoundError) as err:
        raise ValueError(f"{setting(owner, 'teacher', name)} cannot be read: {err}") from err


def _from_checkpoint(path: Path) -> tuple[FrozenTeacher, dict[str, Any]]:
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
    center = state.get("loss.center")
    return FrozenTeacher(backbone, head), {
        "head": head_kwargs,
        "teacher_temp": float(hp.get("teacher_temp", 0.04)),
        "center": None if center is None else center.clone(),
    }
