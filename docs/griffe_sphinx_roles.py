"""A Griffe extension for the API reference: the docstrings' Sphinx roles as links or code.

The package's docstrings cross-reference with Sphinx roles (``:class:`~lightning_dino.DINO```),
which mkdocstrings shows as raw text. Once the package is loaded, every role becomes a link to
the object's entry when the reference page documents it (a name of ``lightning_dino.__all__``,
however the role spells its module), and inline code (the name) otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the package's docstrings once it is loaded (its exports are then known)."""
        if pkg.path != "lightning_dino":
            return
        public = {}
        for name in pkg.exports or ():
            member = pkg.members.get(name)
            if member is None:
                continue
            public[f"lightning_dino.{name}"] = f"lightning_dino.{name}"
            target = member.final_target if member.is_alias else member
            public[target.path] = f"lightning_dino.{name}"
        self._visit(pkg, public)

    def _visit(self, obj: griffe.Object, public: dict[str, str]) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: _rewrite(m, public), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, public)


def _rewrite(match: re.Match[str], public: dict[str, str]) -> str:
    """A role as ``[name][identifier]`` when documented, else as the name in code."""
    short, path = match.group(1), match.group(2)
    shown = path.rsplit(".", 1)[-1] if short else path
    identifier = public.get(path)
    return f"[`{shown}`][{identifier}]" if identifier else f"`{shown}`"
