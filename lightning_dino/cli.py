"""The ``lightning-dino`` command.

``fit`` / ``validate`` / ``test`` / ``predict`` go to LightningCLI (``DINO`` +
``MultiCropDataModule``, keys ``--model.*``, ``--data.*``, ``--trainer.*``); the tools
(``export``, ``knn``...) are plain functions whose typed arguments jsonargparse turns into flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, lazy_instance
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_dino import __version__
from lightning_dino.checkpointing import DINOCheckpoint
from lightning_dino.data import MultiCropDataModule
from lightning_dino.module import DINO

# Tool name -> "module:function"; imported only when the tool runs.
TOOLS: dict[str, str] = {
    name: f"lightning_dino.tools:{name}"
    for name in ("export", "embed", "knn", "probe", "attention")
}


class DINOCLI(LightningCLI):
    """LightningCLI with DINO's defaults: TensorBoard logs, a checkpoint each epoch plus last."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the always-on checkpoint callback, configurable as ``--checkpoint.*``.

        :class:`~lightning_dino.checkpointing.DINOCheckpoint` writes atomically, keeps one file
        per epoch and refreshes ``last.ckpt`` every ``--checkpoint.last_every_n_train_steps``.
        """
        parser.add_lightning_class_args(DINOCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.filename": "{epoch}-{step}",
                "trainer.logger": lazy_instance(
                    TensorBoardLogger, save_dir="runs", name="dino", default_hp_metric=False
                ),
            }
        )


def train(args: ArgsType = None, run: bool = True) -> DINOCLI:
    """Run LightningCLI on :class:`DINO` and :class:`MultiCropDataModule`.

    Args:
        args: Arguments such as ``["fit", "--config", "configs/quickstart.yaml"]``; None reads
            ``sys.argv``.
        run: Run the subcommand (False only builds model, data module and trainer).

    Returns:
        The CLI object (``cli.model``, ``cli.datamodule``, ``cli.trainer``).
    """
    return DINOCLI(
        DINO,
        MultiCropDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"version": __version__},
        args=args,
        run=run,
    )


def _load_tool(name: str) -> Callable[..., Any]:
    module_name, func_name = TOOLS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def run_tool(name: str, args: list[str]) -> Any:
    """Parse ``args`` against the tool function's signature and call it.

    Built with ``add_function_arguments`` rather than ``auto_cli``: a tool parameter named
    ``config`` (the fit config a tool reads) must stay a plain argument, while ``auto_cli`` would
    read it as a config file of the tool's own arguments.

    Args:
        name: A key of :data:`TOOLS`.
        args: The tool's command-line arguments.

    Returns:
        The tool's return value.
    """
    tool = _load_tool(name)
    parser = ArgumentParser(prog=f"lightning-dino {name}", description=tool.__doc__.splitlines()[0])
    parser.add_function_arguments(tool, as_positional=False)
    return tool(**parser.instantiate(parser.parse_args(args)).as_dict())


def _overview() -> str:
    tools = "\n".join(f"  {name:<10} {_load_tool(name).__doc__.splitlines()[0]}" for name in TOOLS)
    return (
        f"lightning-dino {__version__}: DINO self-supervised pre-training.\n\n"
        "Training (LightningCLI; `lightning-dino fit --help` lists every key):\n"
        "  fit        train: lightning-dino fit --config configs/quickstart.yaml\n"
        "  validate, test, predict\n\n"
        f"Tools (`lightning-dino TOOL --help`):\n{tools}\n"
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-dino`` and ``python -m lightning_dino``.

    Args:
        args: Command-line arguments without the program name; None reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        run_tool(argv[0], argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        if not argv:
            return
    train(args)
