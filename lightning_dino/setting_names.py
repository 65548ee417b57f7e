"""Name a setting in a message the way its caller set it: as a command-line flag or in Python.

Errors and warnings name the setting to change. Someone who ran ``lightning-dino fit
--model.warmup_epochs 0.5`` reads ``--model.warmup_epochs=0.5``; someone who wrote
``DINO(warmup_epochs=0.5)`` reads ``DINO(warmup_epochs=0.5)``. The ``lightning-dino`` command
enters :func:`cli_flags` around parsing and running; every other caller gets the Python form.

The forms, for :func:`setting`'s ``owner``:

========================  ==============================  ========================================
owner                     command line                    Python
========================  ==============================  ========================================
``"model"``               ``--model.lr=0.001``            ``DINO(lr=0.001)``
``"data"``                ``--data.batch_size=64``        ``MultiCropDataModule(batch_size=64)``
``"trainer"``             ``--trainer.precision=32``      ``Trainer(precision=32)``
``"checkpoint"``          ``--checkpoint.dirpath=DIR``    ``DINOCheckpoint(dirpath='DIR')``
a function (tool) name    ``--out=DIR``                   ``prepare_streaming_dataset(out='DIR')``
========================  ==============================  ========================================

Without a value, the value is ``...`` in Python (``DINO(lr=...)``) and left out on the command
line (``--model.lr``). Values print as typed: on the command line as text (``true`` for
``True``), in Python as literals (paths as strings).

The style lives in a :class:`contextvars.ContextVar`, so it follows the process (and thread or
task) that entered :func:`cli_flags`, and is restored on leaving it, also on an error: a notebook
that runs the CLI and then the Python API reads Python names again. Processes the trainer starts
by re-running the command (Lightning's ``ddp``) enter it again themselves; processes started
otherwise (``ddp_spawn``, DataLoader workers under the ``spawn`` start method) use the Python
form. The messages that matter, the checks before and while training, are raised in the main
process.

Examples:
    >>> setting("model", "warmup_epochs", 0.5)
    'DINO(warmup_epochs=0.5)'
    >>> with cli_flags():
    ...     setting("model", "warmup_epochs", 0.5)
    '--model.warmup_epochs=0.5'
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

# Section of the ``fit`` command -> the Python class its flags are arguments of.
_SECTIONS: dict[str, str] = {
    "model": "DINO",
    "data": "MultiCropDataModule",
    "trainer": "Trainer",
    "checkpoint": "DINOCheckpoint",
}

_UNSET: Any = object()
_CLI_FLAGS: ContextVar[bool] = ContextVar("lightning_dino_cli_flags", default=False)


@contextmanager
def cli_flags() -> Iterator[None]:
    """Name settings as command-line flags inside the ``with`` block (the ``lightning-dino`` CLI).

    Yields:
        Nothing; the previous style is restored on leaving, also on an exception.
    """
    token = _CLI_FLAGS.set(True)
    try:
        yield
    finally:
        _CLI_FLAGS.reset(token)


def using_cli() -> bool:
    """Whether messages name settings as command-line flags (inside :func:`cli_flags`)."""
    return _CLI_FLAGS.get()


def setting(owner: str | object, name: str, value: Any = _UNSET) -> str:
    """Name the setting ``name`` of ``owner``, with its value if given, in the caller's style.

    Args:
        owner: A section of the ``fit`` command (``"model"``, ``"data"``, ``"trainer"``,
            ``"checkpoint"``), the name of a function whose arguments are a command's flags
            without prefix (``"prepare_streaming_dataset"``, ``"Trainer.fit"``), or the model
            itself (a method module or its class): its flags are ``--model.*`` and its Python
            name is its own class's (``Distillation(objective=...)``).
        name: The argument's name, e.g. ``"warmup_epochs"``.
        value: The value to show; left out, the name alone.

    Returns:
        E.g. ``--model.warmup_epochs=0.5`` under :func:`cli_flags`, else
        ``DINO(warmup_epochs=0.5)``; without a value ``--model.warmup_epochs`` and
        ``DINO(warmup_epochs=...)``.
    """
    if not isinstance(owner, str):
        python_name = (owner if isinstance(owner, type) else type(owner)).__name__
        owner = "model"
    else:
        python_name = _SECTIONS.get(owner, owner)
    if using_cli():
        prefix = f"--{owner}." if owner in _SECTIONS else "--"
        return f"{prefix}{name}" if value is _UNSET else f"{prefix}{name}={_flag_value(value)}"
    python_value = "..." if value is _UNSET else _python_value(value)
    return f"{python_name}({name}={python_value})"


def _flag_value(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _python_value(value: Any) -> str:
    """A value as a Python literal; a path as its string."""
    return repr(os.fspath(value) if isinstance(value, os.PathLike) else value)
