"""Numerics shared by every loss term: computing in full precision under mixed precision."""

from __future__ import annotations

import contextlib

import torch


def full_precision(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Switch autocast off on ``device`` so the ops inside run in the dtype of their inputs.

    Mixed precision (``bf16-mixed``, ``16-mixed``) autocasts matrix products such as the loss's
    pairing ``einsum`` to 16 bits; every loss term and its statistics are computed inside this
    context on fp32 inputs instead.

    Args:
        device: The device of the tensors (its type selects the autocast to disable).

    Returns:
        A context manager.
    """
    return torch.autocast(device_type=device.type, enabled=False)

