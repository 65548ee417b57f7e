"""The callbacks a method module brings to every Trainer it is fitted by."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def callbacks_to_bring(
    trainer: pl.Trainer | None,
    required: list[Callback],
    optional: list[type[Callback]],
    brought: list[Callback],
) -> tuple[list[Callback], list[Callback]]:
    """What ``configure_callbacks`` returns: the required callbacks and the missing optional ones.

    The required ones are part of the method (the teacher EMA) or of exact resuming; an optional
    one (a monitor) is brought only when the trainer has none of its type, so the user's own
    settings are kept. A second ``fit`` on the same Trainer still holds what the module brought
    the first time: those are kept and not brought twice.

    Args:
        trainer: The trainer, or None before the module is attached to one.
        required: New instances of the callbacks the method needs.
        optional: Types of the monitors to bring when the trainer has none.
        brought: What an earlier call returned (from its second value).

    Returns:
        ``(callbacks to return, everything brought so far)``.
    """
    present = list(trainer.callbacks) if trainer is not None else []
    kept = [c for c in present if any(c is mine for mine in brought)]
    callbacks = [c for c in required if type(c) not in {type(k) for k in kept}]
    for default in optional:
        if not any(isinstance(c, default) for c in present):
            callbacks.append(default())
    return callbacks, [*kept, *callbacks]
