"""Start a run from the weights of an earlier run of this package: read once, when it starts.

DINOv3 continues a trained model into its later phases (Gram anchoring, high-resolution
adaptation) by loading the earlier run's teacher into the new student, the new EMA teacher being
a copy of it (``student.resume_from_teacher_chkpt`` in facebookresearch/dinov3
``dinov3/train/ssl_meta_arch.py``); the optimizer, the schedules and the loss centres start
afresh. :func:`load_start_weights` does this from a checkpoint of this package. It is called when
a run starts from step 0, so the file is not needed to resume, export or load the new run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_dino.io.export import default_network, read_checkpoint
from lightning_dino.setting_names import setting


def load_start_weights(
    student: nn.Module, teacher: nn.Module, path: str | Path, owner: object = "model"
) -> list[str]:
    """Load a checkpoint's evaluated network into ``student``, and copy ``student`` to ``teacher``.

    The backbone must match exactly; the heads (DINO, iBOT) and the mask token are taken when
    the checkpoint has them with the same shapes, and keep their fresh initialisation otherwise.

    Args:
        student: The new run's student (``backbone``, ``head``...).
        teacher: Its EMA teacher, set to a copy of the loaded student.
        path: A checkpoint of this package (its EMA teacher for a DINO run, its student EMA for
            a distillation run).
        owner: The method, for the names in messages.

    Returns:
        The student's parameters and buffers that start fresh (empty when all were loaded).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If its backbone does not fit the student's.
    """
    name = setting(owner, "start_from", str(path))
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{name}: no such file; a run reads it when it starts")
    ckpt = read_checkpoint(Path(path).expanduser())
    prefix = f"{default_network(ckpt)}."
    saved = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    own = student.state_dict()
    backbone = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    wanted = {k for k in own if k.startswith("backbone.")}
    if backbone.keys() != wanted or any(own[k].shape != v.shape for k, v in backbone.items()):
        raise ValueError(
            f"{name}: its backbone does not fit this run's ({len(backbone)} tensors against "
            f"{len(wanted)}, or other shapes); start from a run of the same backbone settings"
        )
    taken = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for key, value in taken.items():
            own[key].copy_(value)
        teacher.load_state_dict(student.state_dict())
    return sorted(set(own) - set(taken))
