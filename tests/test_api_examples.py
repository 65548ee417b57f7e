"""Every public name of ``lightning_dino`` has a summary and an example, and the examples run.

The examples are the docstrings' ``Examples:`` sections, run as doctests with the public names,
``torch``, ``timm``, ``sys`` and ``lightning.pytorch as pl`` in scope; lines marked
``# doctest: +SKIP`` need files or devices a test does not have (a checkpoint, eight GPUs).
"""

from __future__ import annotations

import doctest
import inspect
import sys

import lightning.pytorch as pl
import pytest
import timm
import torch

import lightning_dino

PUBLIC = [name for name in lightning_dino.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_the_public_name_has_a_summary_and_an_example(name):
    doc = inspect.getdoc(getattr(lightning_dino, name)) or ""
    summary = doc.split("\n\n")[0]
    assert summary.endswith("."), f"{name}: the docstring starts without a one-sentence summary"
    assert "\nExamples:\n" in doc, f"{name}: no Examples section"


@pytest.mark.parametrize("name", PUBLIC)
def test_the_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write (DINOCheckpoint's dirpath) write here
    scope = {"torch": torch, "timm": timm, "sys": sys, "pl": pl}
    scope.update({public: getattr(lightning_dino, public) for public in PUBLIC})
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = finder.find(getattr(lightning_dino, name), name, globs=scope)
    for example in examples:
        runner.run(example)
    assert runner.failures == 0, f"{name}: an example printed something else (see the captured output)"
    assert sum(len(example.examples) for example in examples) > 0
