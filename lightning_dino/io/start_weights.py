"""Start a run from existing weights: read once, and never needed to restore the run afterwards.

Three sources, by what ``start_from`` names:

* a checkpoint of this package (``.ckpt``): its evaluated network, backbone and heads (DINOv3
  continues its phases this way: ``student.resume_from_teacher_chkpt`` in facebookresearch/dinov3
  ``dinov3/train/ssl_meta_arch.py``); the heads need no warm-up;
* an export directory of ``lightning-dino export`` (or its ``model.safetensors`` beside its
  ``config.json``): its backbone;
* a weights file of the run's timm backbone (timm's ``.safetensors`` or Meta's released ``.pth``
  of a DINOv2 or DINOv3 model, which timm's own converter reads): its backbone.

The student and the teacher both start as these weights (the teacher a copy of the student); a
source without heads leaves the heads new, to be trained first against the frozen backbone
(``freeze_backbone_steps``). Timm's own ``pretrained`` weights (``backbone_kwargs: {pretrained:
true, pretrained_cfg_overlay: {file: ...}}``) are read the same way (:func:`split_pretrained`).

The weights are read when the module is built if their file is there; a module rebuilt from a
checkpoint of the new run (``load_from_checkpoint``, a resume) does not need it: a missing
file is read when a run starts from step 0 instead, and fails then, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dino.io.export import default_network, load_backbone, read_checkpoint
from lightning_dino.io.sharded_checkpoints import is_sharded_checkpoint
from lightning_dino.networks.backbones import create_timm_backbone
from lightning_dino.networks.sharding import copy_full_
from lightning_dino.setting_names import setting


def split_pretrained(kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Timm arguments to build with now, and those whose weights are read when a run starts.

    Args:
        kwargs: ``backbone_kwargs`` (or a distillation's ``teacher_kwargs``).

    Returns:
        ``(now, later)``: ``later`` is None when nothing waits (no ``pretrained``, or its local
        file is there, read now); else it is ``kwargs`` and ``now`` builds without weights
        (a missing local file, or weights from timm's hub, fetched when training starts).
    """
    kwargs = dict(kwargs or {})
    if not kwargs.get("pretrained"):
        return kwargs, None
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if file is not None and Path(file).expanduser().is_file():
        return kwargs, None
    return {**kwargs, "pretrained": False}, kwargs


def pretrained_weights(
    name: str, kwargs: dict[str, Any], feature_grid: int, owner: object, key: str
) -> dict[str, Tensor]:
    """The weights of a timm backbone built with ``kwargs`` (``pretrained`` and its file).

    Raises:
        FileNotFoundError: If the local weights file is missing, naming ``key``.
    """
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if file is not None and not Path(file).expanduser().is_file():
        raise FileNotFoundError(
            f"{setting(owner, key, kwargs)}: the weights file {file} does not exist; a run "
            "reads it when it starts from step 0"
        )
    return create_timm_backbone(name, 0.0, kwargs, feature_grid).state_dict()


def start_state(
    path: str | Path, backbone: str | nn.Module, backbone_kwargs: dict[str, Any] | None,
    feature_grid: int,
) -> tuple[dict[str, Tensor], bool]:
    """The weights ``start_from`` names, in the student's keys (``backbone.*``, ``head.*``...).

    Args:
        path: A ``.ckpt`` of this package, an export directory, or a weights file of ``backbone``.
        backbone: The run's backbone (a timm name, for a weights file).
        backbone_kwargs: Its timm arguments.
        feature_grid: Its grid pooling.

    Returns:
        ``(state, with_heads)``: the weights, and whether they include the heads.
    """
    path = Path(path).expanduser()
    exported = path.name == "model.safetensors" and (path.parent / "config.json").is_file()
    exported |= path.is_dir() and not is_sharded_checkpoint(path)
    if path.name == "config.json" or exported:
        weights = load_backbone(path).state_dict()
        return {f"backbone.{k}": v for k, v in weights.items()}, False
    if path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)
        prefix = f"{default_network(ckpt)}."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        return state, any(k.startswith("head.") for k in state)
    if not isinstance(backbone, str):
        raise ValueError(
            f"a weights file ({path.name}) needs the backbone given by its timm name, not a module"
        )
    overlay = {**(backbone_kwargs or {}), "pretrained": True,
               "pretrained_cfg_overlay": {"file": str(path)}}
    weights = create_timm_backbone(backbone, 0.0, overlay, feature_grid).state_dict()
    return {f"backbone.{k}": v for k, v in weights.items()}, False


def load_start_weights(
    student: nn.Module, teacher: nn.Module, state: dict[str, Tensor], owner: object = "model"
) -> list[str]:
    """Load ``state`` into ``student``, and copy ``student`` to ``teacher``.

    The backbone must match exactly; the heads (DINO, iBOT) and the mask token are taken when
    ``state`` has them with the same shapes, and keep their fresh initialisation otherwise.

    Args:
        student: The new run's student (``backbone``, ``head``...).
        teacher: Its EMA teacher, set to a copy of the loaded student.
        state: The weights (:func:`start_state`), in the student's keys.
        owner: The method, for the names in messages.

    Returns:
        The student's parameters and buffers that start fresh (empty when all were loaded).

    Raises:
        ValueError: If the backbone does not fit the student's.
    """
    own = student.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    wanted = {k for k in own if k.startswith("backbone.")}
    if backbone.keys() != wanted or any(own[k].shape != v.shape for k, v in backbone.items()):
        missing = sorted(wanted - backbone.keys())[:3]
        raise ValueError(
            f"{setting(owner, 'start_from')}: its backbone does not fit this run's "
            f"({len(backbone)} tensors against {len(wanted)}; missing {missing}, or other shapes); "
            "start from weights of the same backbone settings"
        )
    taken = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for key, value in taken.items():
            copy_full_(own[key], value)
        teacher.load_state_dict(student.state_dict())
    return sorted(set(own) - set(taken))


def start_file(path: str | Path, owner: object) -> Path:
    """``start_from``'s path, or a FileNotFoundError naming the key."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{setting(owner, 'start_from', str(path))}: no such file or directory; a run reads "
            "it when it starts from step 0"
        )
    return resolved
