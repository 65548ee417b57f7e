"""Build step: the wheel carries the repository's ``configs/`` as ``lightning_dino/configs``.

Everything else about the package is declared in ``pyproject.toml``. The recipes stay in one
place in the repository (``configs/``); this copies them into the built package, so an installed
``lightning-dino fit --config quickstart`` finds them (``lightning_dino.recipes``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "configs"


class BuildPyWithRecipes(build_py):
    """``build_py`` that also copies ``configs/*.yaml`` into the built ``lightning_dino``."""

    def run(self) -> None:
        """Build the modules, then copy the recipes beside them."""
        super().run()
        if self.editable_mode:  # an editable install reads configs/ from the checkout
            return
        target = Path(self.build_lib) / "lightning_dino" / "configs"
        self.mkpath(str(target))
        for recipe in sorted(RECIPES.glob("*.yaml")):
            self.copy_file(str(recipe), str(target / recipe.name))


setup(cmdclass={"build_py": BuildPyWithRecipes})
