"""Optional dependencies, imported when a feature first needs them.

``import lightning_dino`` needs only the core dependencies. Streaming datasets need LitData (the
``streaming`` extra) and attention images need matplotlib (the ``plots`` extra); each is imported
by :func:`require` at its first use, which names the extra to install when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, str] = {"litdata": "streaming", "matplotlib": "plots"}
"""Top-level module -> the ``lightning-dino`` extra that installs it."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or say which extra installs it.

    Args:
        module: A module of an optional dependency, e.g. ``"litdata.streaming.downloader"``.
        purpose: What needs it, for the message, e.g. ``"--data.dataset streaming"``.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: If the dependency is not installed.

    Examples:
        >>> require("matplotlib", "attention images").__name__  # doctest: +SKIP
        'matplotlib'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the dependency is there but one of its own imports failed
        extra = EXTRAS[top]
        raise MissingExtraError(
            f"{purpose} needs {top}, which is not installed: "
            f"pip install 'lightning-dino[{extra}]' (or pip install {top})"
        ) from error
