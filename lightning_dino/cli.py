"""The ``lightning-dino`` command.

``fit`` goes to LightningCLI (``DINO`` +
``MultiCropDataModule``, keys ``--model.*``, ``--data.*``, ``--trainer.*``; a config whose
``model`` names a ``class_path``, such as ``lightning_dino.Distillation``, trains that class
with its ``init_args``); the tools
(``export``, ``knn``, ``prepare``...) are plain functions whose typed arguments jsonargparse
turns into flags.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import ArgumentParser, Namespace, lazy_instance
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_dino.data import MultiCropDataModule
from lightning_dino.dino import DINO
from lightning_dino.io.export import UnreadableCheckpointError, read_checkpoint
from lightning_dino.recipes import resolve_config, resolve_config_args
from lightning_dino.setting_names import cli_flags
from lightning_dino.training.checkpointing import DINOCheckpoint
from lightning_dino.training.resume import (
    STRUCTURAL_KEYS,
    ResumeError,
    hyperparameter_changes,
    structural_change_message,
)
from lightning_dino.version import __version__

# Tool name -> "module:function"; imported only when the tool runs.
TOOLS: dict[str, str] = {
    **{
        name: f"lightning_dino.commands:{name}"
        for name in ("export", "embed", "knn", "probe", "attention")
    },
    "prepare": "lightning_dino.data.prepared.writer:prepare_streaming_dataset",
    "consolidate": "lightning_dino.io.sharded_checkpoints:consolidate",
    "configs": "lightning_dino.recipes:configs",
}


class DINOCLI(LightningCLI):
    """LightningCLI with DINO's defaults: TensorBoard logs, a checkpoint each epoch plus last.

    Resuming (``fit --ckpt_path FILE``) differs from LightningCLI's in one way: the checkpoint's
    model hyperparameters fill in only what the configs and flags do not set, so
    ``--ckpt_path RUN/last.ckpt --model.lr 0.001`` trains with the new lr (LightningCLI would
    reload the checkpoint's over it). The module then warns once with every value that differs
    from the checkpoint, and refuses, naming the key, a change of the networks' shape.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: DINO has no validation, test or predict step to run.

        Evaluation is the ``knn`` and ``probe`` tools (and ``KNNMonitor`` during training).
        """
        return {"fit": LightningCLI.subcommands()["fit"]}

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, keeping the arguments to tell what the user set."""
        self._given_args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Fill unset model arguments from ``ckpt_path``'s hyperparameters; the user's win."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = dict(read_checkpoint(ckpt_path).get("hyper_parameters", {}))
        saved = {key: value for key, value in saved.items() if not key.startswith("_")}
        if not saved:
            return
        chosen = self.config[subcommand].get("model")
        if isinstance(chosen, Namespace) and "class_path" in chosen:  # a class_path config
            saved_model: dict[str, Any] = {"class_path": chosen.class_path, "init_args": saved}
        else:
            saved_model = saved
        config = self.parser.parse_object({subcommand: {"model": saved_model}}, self.config)
        given = self._explicit_model_arguments(subcommand)
        if given:
            config = self.parser.parse_object({subcommand: {"model": given}}, config)
        model = config[subcommand].model
        current = model.init_args if "init_args" in model else model  # a class_path config
        changes = hyperparameter_changes(saved, current.as_dict())
        method = _import_class(model.class_path) if "class_path" in model else DINO
        keys = (*STRUCTURAL_KEYS, *getattr(method, "structural_keys", ()))
        message = structural_change_message(changes, ckpt_path, keys, method)
        if message:  # before any data or network is built
            raise ResumeError(message)
        self.config = config

    def _explicit_model_arguments(self, subcommand: str) -> dict[str, Any]:
        """The model arguments set by the configs and flags (defaults left out)."""
        args = self._given_args
        if isinstance(args, dict | Namespace):
            given = Namespace(args).get(f"{subcommand}.model") or Namespace(args).get("model")
        else:
            argv = sys.argv[1:] if args is None else list(args)
            given = self.parser.parse_args(argv, defaults=False).get(f"{subcommand}.model")
        if given is None:
            return {}
        return given.as_dict() if isinstance(given, Namespace) else dict(given)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the always-on checkpoint callback, configurable as ``--checkpoint.*``.

        :class:`~lightning_dino.training.checkpointing.DINOCheckpoint` writes atomically, keeps
        one file per epoch and refreshes ``last.ckpt`` every
        ``--checkpoint.last_every_n_train_steps``.
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
        args: Arguments such as ``["fit", "--config", "quickstart"]`` (a ``--config`` value that
            is no file but a recipe's name reads the packaged recipe); None reads ``sys.argv``.
        run: Run the subcommand (False only builds model, data module and trainer).

    Returns:
        The CLI object (``cli.model``, ``cli.datamodule``, ``cli.trainer``).

    Messages raised while parsing and running name settings as flags (``--model.lr``); what
    runs after ``run=False`` returns names them the Python way
    (:mod:`lightning_dino.setting_names`).
    """
    if isinstance(args, list | tuple):
        args = resolve_config_args(list(args))
    class_path = selected_model_class(args)
    with cli_flags():
        return DINOCLI(
            pl.LightningModule if class_path else DINO,
            MultiCropDataModule,
            # Configs without a class_path mean DINO and keep its flat keys (--model.lr); one
            # that names a class (model: {class_path: lightning_dino.Distillation, init_args:
            # {...}}) is parsed in subclass mode.
            subclass_mode_model=class_path is not None,
            save_config_kwargs={"overwrite": True},
            # The optimizer and its schedules are DINO's own (parameter groups, per-step lr and
            # weight decay): no --optimizer / --lr_scheduler keys that would be ignored.
            auto_configure_optimizers=False,
            parser_kwargs={"version": __version__},
            args=args,
            run=run,
        )


def selected_model_class(args: ArgsType = None) -> str | None:
    """The model ``class_path`` the configs and flags of a ``fit`` command name, if any.

    Read from every ``--config`` file's ``model.class_path`` (also under ``fit:``) and from
    ``--model.class_path`` / ``--model`` flags; the last one given wins, as in jsonargparse.

    Args:
        args: The command's arguments (None reads ``sys.argv``), or a dict of them.

    Returns:
        The class path, or None (the model is :class:`DINO`, configured with flat keys).
    """
    if isinstance(args, dict | Namespace):
        model = Namespace(args).get("fit.model") or Namespace(args).get("model")
        found = model.get("class_path") if isinstance(model, dict | Namespace) else None
        return str(found) if found else None
    argv = list(sys.argv[1:] if args is None else args)
    found = None
    for position, arg in enumerate(argv):
        key, has_value, value = arg.partition("=")
        if not has_value:
            value = argv[position + 1] if position + 1 < len(argv) else ""
        if key in ("--config", "-c"):
            found = _config_class_path(value) or found
        elif key == "--model.class_path" or (key == "--model" and _is_class_name(value)):
            found = value
    return found


def _config_class_path(config: str) -> str | None:
    """``model.class_path`` of a config file (or YAML string), None when it names none."""
    path = Path(resolve_config(config))
    try:
        content = yaml.safe_load(path.read_text() if path.is_file() else config)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(content, dict):
        return None
    model = (content.get("fit") or content).get("model")
    return model.get("class_path") if isinstance(model, dict) else None


def _is_class_name(value: str) -> bool:
    """Whether a ``--model`` value is a dotted class name (not a file or a YAML mapping)."""
    return "." in value and not Path(value).exists() and all(
        part.isidentifier() for part in value.split(".")
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
    args = _with_bare_flags_true(tool, args)
    # jsonargparse renamed instantiate_classes to instantiate (4.43 and older have only the first).
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with cli_flags():
        return tool(**instantiate(parser.parse_args(args)).as_dict())


def _with_bare_flags_true(tool: Callable[..., Any], args: list[str]) -> list[str]:
    """Read a boolean flag given without a value (``--overwrite``) as ``--overwrite true``."""
    flags = {
        f"--{name}"
        for name, annotation in inspect.get_annotations(tool, eval_str=True).items()
        if annotation is bool
    }
    expanded = []
    for position, arg in enumerate(args):
        expanded.append(arg)
        following = args[position + 1] if position + 1 < len(args) else "--"
        if arg in flags and following.startswith("--"):
            expanded.append("true")
    return expanded


def _overview() -> str:
    width = max(map(len, TOOLS))
    tools = "\n".join(
        f"  {name:<{width}} {_load_tool(name).__doc__.splitlines()[0]}" for name in TOOLS
    )
    return (
        f"lightning-dino {__version__}: DINO self-supervised pre-training.\n\n"
        "Training (LightningCLI; `lightning-dino fit --help` lists every key):\n"
        "  fit        train: lightning-dino fit --config quickstart (a recipe name, or a file)\n"
        "  benchmark  a short run of a recipe on this device: images/s, memory, MFU\n"
        "  (evaluation: the knn and probe tools; DINO has no validation loop)\n\n"
        f"Tools (`lightning-dino TOOL --help`):\n{tools}\n\n"
        "lightning-dino --version prints the version.\n"
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-dino`` and ``python -m lightning_dino``.

    Args:
        args: Command-line arguments without the program name; None reads ``sys.argv``.
    """
    argv = resolve_config_args(list(sys.argv[1:] if args is None else args))
    if argv in (["--version"], ["-V"]):
        print(f"lightning-dino {__version__}")
        return
    if argv and argv[0] in TOOLS:
        run_tool(argv[0], argv[1:])
        return
    if argv and argv[0] == "benchmark":
        from lightning_dino import benchmark

        try:
            with cli_flags():
                benchmark.main(argv[1:], train)
        except (benchmark.OutOfMemory, FileNotFoundError, ValueError) as error:
            sys.exit(f"lightning-dino benchmark: error: {error}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        if not argv:
            return
    if args is None:  # LightningCLI reads sys.argv; give it the recipes' paths
        sys.argv[1:] = argv
    try:
        train(None if args is None else argv)
    except (UnreadableCheckpointError, ResumeError) as error:
        sys.exit(f"lightning-dino: error: {error}")


def _import_class(class_path: str) -> type:
    """The class a config's ``class_path`` names (``lightning_dino.Distillation``)."""
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)
