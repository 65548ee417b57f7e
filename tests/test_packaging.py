"""The package as users install it: packaged recipes, optional extras, declared imports, version."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import lightning_dino
from lightning_dino import recipes
from lightning_dino.cli import main
from lightning_dino.extras import EXTRAS, MissingExtraError, require

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}


def _requirement_names(requirements):
    return {re.split(r"[\[<>=!~; ]", requirement)[0].lower() for requirement in requirements}


def test_every_third_party_import_of_the_package_is_declared():
    imported = set()
    for path in (REPO / "lightning_dino").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) if name != "lightning_dino"}
    declared = _requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in third_party:
        distribution = DISTRIBUTIONS.get(name, name).lower()
        if name in EXTRAS:  # imported only under TYPE_CHECKING; at run time through require()
            assert distribution in _requirement_names(extras[EXTRAS[name]]), name
        else:
            assert distribution in declared, f"lightning_dino imports {name}; declare {distribution}"


def test_the_dev_extra_pulls_every_other_extra():
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    for extra in set(EXTRAS.values()):
        assert re.search(rf"lightning-dino\[[^\]]*\b{extra}\b", dev), extra


# Modules that import an extra at their top: only imported inside functions, after require().
EXTRA_ONLY_MODULES = {"lightning_dino.data.prepared.split"}


def test_optional_modules_are_imported_only_through_require():
    for path in (REPO / "lightning_dino").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top-level statements: no module that needs an extra
            if isinstance(node, ast.ImportFrom):
                assert node.module not in EXTRA_ONLY_MODULES, f"{path.name} imports {node.module} at its top"
        if ".".join(path.relative_to(REPO).with_suffix("").parts) in EXTRA_ONLY_MODULES:
            continue
        guarded = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in ast.walk(node)
        }
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            for name in names:
                if name.split(".")[0] in EXTRAS:
                    assert id(node) in guarded, f"{path.name} imports {name} outside TYPE_CHECKING"


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)  # import litdata now fails
    with pytest.raises(MissingExtraError, match=r"lightning-dino\[streaming\]"):
        require("litdata", "streaming datasets")
    with pytest.raises(ImportError, match=r"lightning-dino\[streaming\]"):
        lightning_dino.prepare_streaming_dataset(str(REPO / "tests"), "unused")


def test_the_version_has_one_source(capsys):
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert "version" not in PYPROJECT["project"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "lightning_dino.version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", lightning_dino.__version__)
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"lightning-dino {lightning_dino.__version__}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {lightning_dino.__version__}" in changelog


def test_the_licence_is_declared_and_shipped():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()


def test_the_recipes_are_the_repository_configs():
    assert recipes.recipe_names() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    for name in ("quickstart", "quickstart.yaml"):
        assert recipes.recipe_path(name).read_text() == (REPO / "configs/quickstart.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="quickstart"):
        recipes.recipe_path("no_such_recipe")


def test_a_config_value_is_a_file_first_then_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = str(recipes.recipe_path("quickstart"))
    assert recipes.resolve_config("quickstart") == packaged
    assert recipes.resolve_config("configs/quickstart.yaml") == packaged  # the README's path
    assert recipes.resolve_config("missing.yaml") == "missing.yaml"  # the parser reports it
    (tmp_path / "quickstart").write_text("seed_everything: 1\n")
    assert recipes.resolve_config("quickstart") == "quickstart"
    assert recipes.resolve_config_args(["fit", "--config=my_images", "--config", "x.yaml"]) == [
        "fit",
        f"--config={recipes.recipe_path('my_images')}",
        "--config",
        "x.yaml",
    ]


def test_fit_reads_a_recipe_by_name_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstart", "--print_config"])
    assert exit_info.value.code == 0
    assert "dataset: fashion_mnist" in capsys.readouterr().out


def test_the_configs_tool_lists_and_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["configs"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in recipes.recipe_names())
    main(["configs", "--name", "quickstart"])
    assert (tmp_path / "quickstart.yaml").read_text() == recipes.recipe_path("quickstart").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["configs", "--name", "quickstart"])
    main(["configs", "--name", "quickstart", "--overwrite"])
