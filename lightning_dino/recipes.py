"""The recipes: the YAML configs of ``lightning-dino fit`` that ship inside the package.

The repository keeps one copy of them, in its top-level ``configs/`` folder; building the wheel
copies that folder to ``lightning_dino/configs`` (``setup.py``). So an installed package finds
its recipes beside its modules, and a source checkout finds them in ``configs/``.

``lightning-dino fit --config quickstart`` reads the packaged ``quickstart.yaml`` when no file
``quickstart`` exists; ``lightning-dino configs`` lists the recipes and copies one to edit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "configs"
_CHECKOUT = Path(__file__).resolve().parents[1] / "configs"


def recipes_dir() -> Path:
    """The folder holding the recipes: the installed package's, else the source checkout's.

    Returns:
        ``lightning_dino/configs`` in an installed wheel, ``configs/`` in a source checkout.

    Raises:
        FileNotFoundError: If neither holds any recipe (a broken install).
    """
    for folder in (_PACKAGED, _CHECKOUT):
        if any(folder.glob("*.yaml")):
            return folder
    raise FileNotFoundError(
        f"no recipes found in {_PACKAGED} or {_CHECKOUT}: reinstall lightning-dino"
    )


def recipe_names() -> list[str]:
    """The recipes' names, sorted: ``quickstart`` for ``quickstart.yaml``."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The packaged file of the recipe ``name`` (``"quickstart"`` or ``"quickstart.yaml"``).

    Args:
        name: A recipe's name, with or without ``.yaml``.

    Returns:
        Its path.

    Raises:
        FileNotFoundError: If no recipe has that name; the message lists those that exist.
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = recipes_dir() / f"{stem}.yaml"
    if "/" in stem or not path.is_file():
        raise FileNotFoundError(
            f"no recipe named {name!r}; the packaged recipes are: {', '.join(recipe_names())}"
        )
    return path


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file: itself when it exists, else the recipe of that name.

    Args:
        value: What the user passed: a path, or a recipe's name.

    Returns:
        ``value`` when it is an existing file or no recipe has that name (the parser then
        reports the missing file), else the recipe's path.
    """
    if Path(value).exists():
        return value
    try:
        return str(recipe_path(Path(value).name if value.startswith("configs/") else value))
    except FileNotFoundError:
        return value


def resolve_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with each ``--config`` value passed through :func:`resolve_config`.

    Args:
        args: Arguments such as ``["fit", "--config", "quickstart"]``.

    Returns:
        The same arguments, recipe names replaced by their packaged paths.
    """
    resolved = []
    for position, arg in enumerate(args):
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        elif position > 0 and args[position - 1] == "--config":
            arg = resolve_config(arg)
        resolved.append(arg)
    return resolved


def _description(path: Path) -> str:
    """The first comment line of a recipe, without its ``#``."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def configs(name: str | None = None, out: Path | None = None, overwrite: bool = False) -> str:
    """List the packaged recipes, or write a copy of one to edit.

    Without ``name``: print each recipe's name and first comment line. With ``name``: copy the
    recipe to ``out`` (default ``NAME.yaml`` in the current directory), to edit and then train
    with ``lightning-dino fit --config NAME.yaml``.

    Args:
        name: The recipe to copy, e.g. ``quickstart``; None lists them all.
        out: Where to write the copy (a file, or an existing folder).
        overwrite: Replace an existing file at ``out``.

    Returns:
        The listing, or the path written.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
    """
    if name is None:
        width = max(len(stem) for stem in recipe_names())
        listing = "\n".join(
            f"{stem:<{width}}  {_description(recipe_path(stem))}" for stem in recipe_names()
        )
        print(f"Recipes in {recipes_dir()} (lightning-dino fit --config NAME):\n{listing}")
        return listing
    source = recipe_path(name)
    target = Path(out) if out is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"wrote {target}; train with: lightning-dino fit --config {target}")
    return str(target)
