"""Resuming a run: what a checkpoint may change, and end-of-epoch checkpoints that resume exactly.

:func:`check_resume` is what the method base's ``on_load_checkpoint`` does
(:class:`~lightning_dino.training.method.Method`): Lightning calls that hook with the loaded
checkpoint before it loads the weights and the loop state, so the functions here see (and may
fix) the checkpoint before anything of it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dino.setting_names import setting


class ResumeError(ValueError):
    """A checkpoint cannot be resumed by this model (its networks have another shape)."""


# Hyperparameters of every method that decide the shapes or the meaning of the saved weights: a
# checkpoint written with other values cannot be loaded into this model. A method adds its own
# (its ``structural_keys``: head sizes, an objective).
STRUCTURAL_KEYS = ("backbone", "backbone_kwargs", "feature_grid")


def hyperparameter_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Hyperparameters whose value differs between a checkpoint and the module resuming from it.

    Args:
        saved: ``checkpoint["hyper_parameters"]``.
        current: The resuming module's ``hparams``.

    Returns:
        ``{key: (checkpoint value, current value)}`` for every key present in both that differs,
        in the order of ``current``.
    """
    return {
        key: (saved[key], value)
        for key, value in current.items()
        if key in saved and not _same(saved[key], value)
    }


def structural_change_message(
    changes: Mapping[str, tuple[Any, Any]],
    path: str,
    keys: tuple[str, ...] = STRUCTURAL_KEYS,
    owner: object = "model",
) -> str | None:
    """The error for changes that make a checkpoint unloadable, or None when there are none.

    Args:
        changes: The output of :func:`hyperparameter_changes`.
        path: The checkpoint's file name, for the message.
        keys: The hyperparameters that shape the saved networks.
        owner: The resuming module, for the names in the message.

    Returns:
        A message naming every structural key that changed and the way out, or None.
    """
    bad = [key for key in keys if key in changes]
    if not bad:
        return None
    listed = ", ".join(
        f"{setting(owner, key, changes[key][1])} (checkpoint: {changes[key][0]!r})" for key in bad
    )
    return (
        f"cannot resume from {path}: {listed} changes the shape of the saved networks. Resume "
        "with the run's own values (its config.yaml), or start a new run from the exported "
        f"weights instead of {setting('Trainer.fit', 'ckpt_path')}."
    )


def settle_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Turn an end-of-epoch checkpoint's loop state into "epoch done, the next not started".

    A checkpoint written in ``on_train_epoch_end`` (``epoch=E-step=S.ckpt`` and the ``last.ckpt``
    of that moment) records epoch ``E`` as processed but not completed. Lightning resumes that
    state exactly when training is bounded by ``max_epochs``, but with ``max_steps`` it re-enters
    epoch ``E``: one more batch is counted in it and epoch ``E + 1`` restarts from its beginning
    (the data order and every later step then differ from the uninterrupted run). Marking epoch
    ``E`` completed and resetting the per-epoch counters, as Lightning does itself when an epoch
    ends, makes both cases start epoch ``E + 1`` at its first batch.

    Args:
        checkpoint: A loaded Lightning checkpoint, changed in place.

    Returns:
        Whether the loop state was an end-of-epoch state (and was changed).
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop:
        return False
    epochs = fit_loop["epoch_progress"]
    batches = fit_loop["epoch_loop.batch_progress"]
    current = epochs["current"]
    at_epoch_end = (
        current["ready"] == current["started"] == current["processed"] == current["completed"] + 1
        and batches["is_last_batch"]
        and batches["current"]["completed"] == batches["current"]["ready"]
    )
    if not at_epoch_end:
        return False
    epochs["current"]["completed"] += 1
    epochs["total"]["completed"] += 1
    _zero(batches["current"])
    batches["is_last_batch"] = False
    _zero(fit_loop["epoch_loop.scheduler_progress"]["current"])
    optimizer = fit_loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    for tracker in optimizer.values():
        _zero(tracker["current"])
    val_batches = fit_loop.get("epoch_loop.val_loop.batch_progress")
    if val_batches:
        _zero(val_batches["total"])
    return True


def _zero(counters: dict[str, int]) -> None:
    for key in counters:
        counters[key] = 0


def _same(a: Any, b: Any) -> bool:
    """Equality that treats a tuple and a list with the same items (a YAML round trip) as equal."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


# State-dict keys of checkpoints written by lightning_dino 0.1, before the optional loss terms
# became objects of their own (iBOT's centre, the Gram teacher), and what they are called now.
_RENAMED_KEYS = (("ibot.center", "ibot.loss.center"), ("gram_teacher.", "gram.teacher."))


def upgrade_state_dict(state_dict: dict[str, Any]) -> list[str]:
    """Rename, in place, the keys of a 0.1 checkpoint's ``state_dict`` to today's names.

    Args:
        state_dict: A checkpoint's ``state_dict`` (changed in place).

    Returns:
        The old keys that were renamed (empty for a checkpoint written by this version).
    """
    renamed = []
    for key in list(state_dict):
        for old, new in _RENAMED_KEYS:
            if key == old or (old.endswith(".") and key.startswith(old)):
                state_dict[new + key[len(old) :]] = state_dict.pop(key)
                renamed.append(key)
    return renamed


def check_resume(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Check a checkpoint against the module resuming from it, and settle it (see below).

    * Keys of older checkpoints are renamed (:func:`upgrade_state_dict`).
    * A checkpoint written with the user's own ``nn.Module`` backbone cannot rebuild it.
    * Under a Trainer: network-shaping hyperparameters that differ fail, naming the keys; other
      differences are what the command line changed on resume (this run's values win, one
      warning lists them); an end-of-epoch checkpoint's loop state is rewritten
      (:func:`settle_epoch_end`).

    Args:
        module: The module (its ``hparams``, and its trainer when it has one).
        checkpoint: The loaded checkpoint (changed in place).

    Raises:
        ResumeError: If the checkpoint's networks cannot be rebuilt or loaded by this module.
    """
    upgrade_state_dict(checkpoint.get("state_dict", {}))
    saved = checkpoint.get("hyper_parameters") or {}
    if saved and "backbone" not in saved and isinstance(module.hparams.get("backbone"), str):
        raise ResumeError(
            "this checkpoint was trained with your own nn.Module backbone, which a checkpoint "
            f"cannot rebuild: pass the same module again, e.g. "
            f"{type(module).__name__}.load_from_checkpoint(path, backbone=MyBackbone(...))"
        )
    if module._trainer is None:  # load_from_checkpoint: the hyperparameters are the file's
        return
    for warning in module.resume_warnings(saved):
        rank_zero_warn(warning)
    path = str(module.trainer.ckpt_path)
    changes = hyperparameter_changes(saved, module.hparams)
    keys = (*STRUCTURAL_KEYS, *getattr(module, "structural_keys", ()))
    message = structural_change_message(changes, path, keys, module)
    if message:
        raise ResumeError(message)
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        rank_zero_warn(
            f"resuming from {path} with hyperparameters that differ from the checkpoint's "
            f"(this run's values are used): {listed}"
        )
    settle_epoch_end(checkpoint)
