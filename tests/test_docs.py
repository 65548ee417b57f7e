"""Every command in README.md and docs/*.md still parses: no stale flag, key, file or tool argument.

Commands come from ``bash`` blocks and from inline code spans that start like a command. Each is
checked without running it (training runs are minutes to days):

* ``lightning-dino fit ...`` (also through ``python -m``, ``torchrun -m``, ``srun``): LightningCLI
  parses it with ``--print_config`` (every config file, key and value type);
* ``lightning-dino <tool> ...``: the tool's own parser reads the arguments;
* ``python benchmarks/<script>.py ...``: the script exists and its ``parse_args`` accepts them;
* ``python examples/<script>.py``: the script exists; ``make <target>``: the Makefile has it.

Commands of other programs (``pip``, ``tensorboard``, ``aws``...) are listed in
``OTHER_PROGRAMS``; anything else fails, so a new kind of command gets a check before it lands.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from lightning_dino.cli import TOOLS, _load_tool, _with_bare_flags_true, train

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
OTHER_PROGRAMS = {"git", "pip", "tensorboard", "aws", "gsutil", "sbatch", "cp", "rsync", "export", "cd"}
COMMAND_START = re.compile(r"^(lightning-dino |python (-m lightning_dino|benchmarks/|examples/)|make )")


def bash_commands(text: str) -> list[str]:
    """Commands of the ``bash`` blocks, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code spans (which may wrap across lines) that start like a command."""
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks))
    return [span for span in spans if COMMAND_START.match(span)]


def all_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for command in bash_commands(text) + inline_commands(text):
            found.append((page.relative_to(REPO).as_posix(), command))
    return found


def normalise(command: str) -> list[str]:
    """The command's words, launchers (srun, torchrun, python -m) reduced to the program."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # environment assignments
        words = words[1:]
    if words and words[0] == "srun":
        words = words[1:]
    if words and words[0] in ("torchrun", "python", "python3") and "-m" in words:
        module_at = words.index("-m")
        if words[module_at + 1] == "lightning_dino":
            words = ["lightning-dino", *words[module_at + 2 :]]
    return words


def check_fit(args: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train(["fit", *args, "--print_config" if "--help" not in args else "--help"])
    assert exit_info.value.code == 0, out.getvalue()


def check_tool(name: str, args: list[str]) -> None:
    tool = _load_tool(name)
    parser = ArgumentParser(prog=f"lightning-dino {name}", exit_on_error=False)
    parser.add_function_arguments(tool, as_positional=False)
    if "--help" not in args:
        parser.parse_args(_with_bare_flags_true(tool, args))


def check_benchmark(args: list[str]) -> None:
    """The benchmark's own flags, then the recipe with its overrides as ``fit`` reads them."""
    from lightning_dino import benchmark

    if "--help" in args:
        return
    options, overrides = benchmark.parse_args(args)
    check_fit(["--config", options.config, *overrides])


def check_script(path: str, args: list[str]) -> None:
    script = REPO / path
    assert script.is_file(), f"{path} does not exist"
    if script.parent.name != "benchmarks" or "--help" in args:
        return
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "parse_args"):
        module.parse_args(args)  # exits with status 2 on an unknown or malformed flag


def check(words: list[str]) -> None:
    program, args = words[0], words[1:]
    if program == "lightning-dino":
        if args in ([], ["--help"], ["--version"]):  # the overview and the version
            return
        assert args[0] in ("fit", "benchmark") or args[0] in TOOLS, f"unknown subcommand {args[0]!r}"
        if len(args) == 1:  # a mention in the prose: the subcommand exists
            return
        if args[0] == "fit":
            check_fit(args[1:])
        elif args[0] == "benchmark":
            check_benchmark(args[1:])
        else:
            check_tool(args[0], args[1:])
    elif program in ("python", "python3", ".venv/bin/python"):
        check_script(args[0], args[1:])
    elif program == "bash":
        script = REPO / args[0]
        assert script.is_file(), f"{args[0]} does not exist"
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert all(target in targets for target in args), f"Makefile has no target {args}"
    else:
        assert program in OTHER_PROGRAMS, f"no check for commands of {program!r}"


COMMANDS = all_commands()


def test_the_pages_hold_commands_of_every_kind():
    programs = {normalise(command)[0] for _, command in COMMANDS}
    assert {"lightning-dino", "python", "make"} <= programs
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_documented_command_parses(page, command):
    check(normalise(command))


@pytest.mark.parametrize(
    "command",
    [
        "lightning-dino fit --config configs/quickstart.yaml --model.no_such_key 1",
        "lightning-dino fit --config configs/no_such_config.yaml",
        "lightning-dino knn --ckpt a.ckpt --no_such_flag 3",
        "lightning-dino benchmark --config quickstart --model.no_such_key 1",
        "lightning-dino benchmark --config quickstart --no-such-flag",
        "lightning-dino no_such_tool --x 1",
        "python benchmarks/no_such_benchmark.py",
        "python benchmarks/loader_throughput.py --no-such-flag",
        "make no_such_target",
        "curl https://example.com",
    ],
)
def test_the_check_rejects_stale_commands(command):
    with pytest.raises((Exception, SystemExit)):
        check(normalise(command))


PYTHON_BLOCKS = [
    (page.relative_to(REPO).as_posix(), block)
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
]


@pytest.mark.parametrize(("page", "code"), PYTHON_BLOCKS, ids=[p for p, _ in PYTHON_BLOCKS])
def test_documented_python_compiles_and_its_lightning_dino_imports_exist(page, code):
    compile(code, page, "exec")
    for module, names in re.findall(r"^from (lightning_dino[\w.]*) import ([^\n(]+)$", code, re.M):
        imported = importlib.import_module(module)
        for name in (n.strip().split(" as ")[0] for n in names.split(",")):
            assert hasattr(imported, name), f"{page}: {module} has no {name}"


API_PAGE = REPO / "docs" / "reference" / "api.md"


def test_the_generated_api_reference_covers_every_public_name():
    """docs/reference/api.md renders each ``__all__`` name from its docstring (mkdocstrings)."""
    import lightning_dino

    directives = set(re.findall(r"^::: lightning_dino\.(\w+)$", API_PAGE.read_text(), flags=re.M))
    missing = [name for name in lightning_dino.__all__ if name not in directives | {"__version__"}]
    assert not missing, f"docs/reference/api.md has no `::: lightning_dino.NAME` entry for {missing}"
    unknown = directives - set(lightning_dino.__all__)
    assert not unknown, f"docs/reference/api.md documents names outside lightning_dino.__all__: {unknown}"


def test_every_page_is_in_the_site_navigation():
    """mkdocs builds every page under docs/, but a page missing from ``nav`` is hard to find."""
    nav = (REPO / "mkdocs.yml").read_text()
    pages = [p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").glob("**/*.md")]
    missing = [page for page in pages if f": {page}" not in nav]
    assert not missing, f"mkdocs.yml's nav does not list {missing}"


def test_the_api_reference_turns_sphinx_roles_into_links_or_code():
    """docs/griffe_sphinx_roles.py: a documented name becomes a link, any other name inline code."""
    spec = importlib.util.spec_from_file_location("sphinx_roles", REPO / "docs" / "griffe_sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    public = {"lightning_dino.DINO": "lightning_dino.DINO", "lightning_dino.dino.DINO": "lightning_dino.DINO"}
    text = ("See :class:`~lightning_dino.dino.DINO`, :class:`lightning_dino.DINO` and "
            ":func:`~lightning_dino.training.resume.check_resume`.")
    rewritten = roles.ROLE.sub(lambda match: roles._rewrite(match, public), text)
    assert rewritten == ("See [`DINO`][lightning_dino.DINO], [`lightning_dino.DINO`][lightning_dino.DINO] and "
                         "`check_resume`.")
