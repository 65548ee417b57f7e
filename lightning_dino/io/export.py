"""Export the DINO backbone as a plain timm model (safetensors + config.json), and load it back.

An export directory holds two files and needs nothing of ``lightning_dino`` to be used:

- ``model.safetensors``: the backbone's state dict with no prefix and no DINO head, exactly
  the keys of ``timm.create_model(architecture, num_classes=0, **model_args)``.
- ``config.json``: ``architecture`` (the timm name), ``model_args`` (the ``create_model``
  arguments that rebuild the architecture), ``num_features``, ``source`` (``"teacher"`` or
  ``"student"``), the checkpoint's ``epoch``/``global_step``, and a timm ``pretrained_cfg``
  (preprocessing), in the layout timm's Hugging Face exports use.

Load it with plain timm in either of two ways::

    cfg = json.loads((out_dir / "config.json").read_text())
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(out_dir / "model.safetensors"), num_classes=0, custom_load=False
        ),
        num_classes=0,
        **cfg["model_args"],
    )
    model = timm.create_model(f"local-dir:{out_dir}", pretrained=True)  # timm >= 1.0.16

``num_classes=0`` in the overlay keeps timm's loading strict (otherwise it drops the classifier
and silently tolerates missing keys); ``custom_load=False`` stops timm from treating the file as
the original ``.npz`` of models such as ``vit_tiny_patch16_224``. Pass ``num_classes=N`` (but keep
the overlay's 0) to get the same backbone with a fresh N-way classifier.

A run trained with ``feature_grid: g`` also writes ``"feature_grid": g``: the weights are plain
timm, but the pooling is not, so after loading with timm set it again with
``lightning_dino.networks.backbones.use_grid_pooling(model, g)`` (``load_backbone`` does this).

The teacher is exported by default: it is the network DINO evaluates and the one the official
DINO releases publish. A checkpoint of :class:`~lightning_dino.Distillation` exports the EMA of
its student (``ema``) by default; its ``teacher`` is the frozen network it distilled from.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_dino.data.crops import IMAGENET_MEAN, IMAGENET_STD
from lightning_dino.io.sharded_checkpoints import is_sharded_checkpoint, read_sharded_checkpoint
from lightning_dino.networks.backbones import (
    create_timm_backbone,
    feature_grid_of,
    official_defaults,
    use_grid_pooling,
)
from lightning_dino.setting_names import setting, using_cli
from lightning_dino.version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
Which = Literal["teacher", "student", "ema"]

# Regularisation-only arguments: they do not change the architecture or the eval-mode features,
# and a fine-tuning user passes their own (a duplicate keyword would be a TypeError).
_DROP_RATE_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")
# Where the run's start weights came from: the export has its own.
_START_WEIGHT_ARGS = ("pretrained", "pretrained_cfg_overlay")

# Keys of timm's default pretrained_cfg that describe the network rather than its source weights.
_PRETRAINED_CFG_KEYS = ("first_conv", "classifier")


def export_backbone(
    checkpoint: str | Path, out_dir: str | Path, which: Which | None = None
) -> Path:
    """Write the teacher (or student) backbone of a DINO checkpoint as a plain timm export.

    The checkpoint is read with ``torch.load(weights_only=True)``, so no code is unpickled. The
    weights are checked by loading them strictly into a freshly built timm model before anything
    is written.

    Args:
        checkpoint: A Lightning checkpoint (``.ckpt``) of :class:`lightning_dino.DINO` or
            :class:`lightning_dino.Distillation`.
        out_dir: Directory to write ``model.safetensors`` and ``config.json`` to (created).
        which: ``"teacher"`` (the EMA network DINO evaluates, as in the official releases),
            ``"student"``, or ``"ema"`` (a distillation run's EMA of its student); None: the
            network the checkpoint evaluates (:func:`default_network`).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If it is not a DINO checkpoint or ``which`` is invalid.

    Examples:
        >>> checkpoint = "runs/dino/version_0/checkpoints/last.ckpt"
        >>> out = export_backbone(checkpoint, "exports/vits16")  # doctest: +SKIP
        >>> sorted(path.name for path in out.iterdir())  # doctest: +SKIP
        ['config.json', 'model.safetensors']
    """
    ckpt = read_checkpoint(checkpoint)
    which = which or default_network(ckpt)
    state = backbone_state_dict(ckpt, which, source=checkpoint)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    architecture = hparams.get("backbone")
    out_dir = Path(out_dir)
    if isinstance(architecture, str):
        model = build_timm_backbone(hparams)
        _load_strict(model, state, f"{which} backbone of {checkpoint}")
        config = _timm_config(model, architecture, hparams.get("backbone_kwargs"), ckpt)
    else:
        config = _custom_module_config(ckpt, which)
    config.update(
        source=which,
        epoch=ckpt.get("epoch"),
        global_step=ckpt.get("global_step"),
        checkpoint=str(Path(checkpoint).resolve()),
        lightning_dino_version=__version__,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().contiguous() for key, value in state.items()}
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    n_params = sum(value.numel() for value in weights.values())
    rank_zero_info(
        f"Exported the {which} backbone of {checkpoint} (epoch {config['epoch']}, step "
        f"{config['global_step']}): {len(weights)} tensors, {n_params / 1e6:.2f} M parameters, "
        f"{config['num_features']}-d features -> {out_dir / WEIGHTS_NAME}, {out_dir / CONFIG_NAME}"
    )
    if architecture is None:
        rank_zero_warn(_custom_module_hint(out_dir))
    return out_dir


def load_backbone(path: str | Path, which: Which | None = None) -> nn.Module:
    """Load a DINO backbone from an export directory or a Lightning checkpoint.

    It comes back as ``timm.create_model`` returns a model: in train mode with every parameter
    trainable, ready for fine-tuning. For feature extraction call ``.eval()`` (the package's
    own tools do).

    An export directory is loaded with plain timm (``pretrained_cfg_overlay``); a checkpoint is
    read with ``weights_only=True``, the timm model is rebuilt from its hyperparameters and the
    prefixed backbone weights are loaded strictly.

    Args:
        path: An export directory (or its ``config.json`` / ``model.safetensors``), a ``.ckpt``
            file or a sharded run's checkpoint folder.
        which: For a checkpoint, ``"teacher"``, ``"student"`` or ``"ema"``; None (default) is
            the network it evaluates (:func:`default_network`). For an export, None or the
            network it holds (a mismatch is an error).

    Returns:
        The backbone, a timm model without classifier mapping (B, C, H, W) images to (B, D)
        features, on the CPU, in train mode, ``requires_grad=True``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is neither an export nor a DINO checkpoint, if its backbone was a
            custom ``nn.Module`` (no timm name to rebuild it from), or if ``which`` mismatches.

    Examples:
        >>> backbone = load_backbone("exports/vits16").eval()  # doctest: +SKIP
        >>> features = backbone(images)  # (B, D)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if path.is_dir() and not is_sharded_checkpoint(path):
        return _load_export(path, which).train().requires_grad_(True)
    ckpt = read_checkpoint(path)
    which = which or default_network(ckpt)
    state = backbone_state_dict(ckpt, which, source=path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    architecture = hparams.get("backbone")
    if not isinstance(architecture, str):
        raise ValueError(
            f"{path} was trained with a custom nn.Module backbone (no timm name in its "
            "hyperparameters), so it cannot be rebuilt automatically. Run `export_backbone` and "
            f"load the weights into your module: {_custom_module_hint(Path('EXPORT_DIR'))}"
        )
    model = build_timm_backbone(hparams)
    _load_strict(model, state, f"{which} backbone of {path}")
    return model.train().requires_grad_(True)


class UnreadableCheckpointError(ValueError):
    """A file given as a checkpoint that cannot be read as one (truncated, foreign, unsafe)."""


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU without unpickling any code.

    Args:
        checkpoint: Path of the ``.ckpt`` file, or a sharded run's checkpoint folder
            (:mod:`~lightning_dino.io.sharded_checkpoints`).

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``, ``epoch``...).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnreadableCheckpointError: If the file is not a checkpoint that safe
            (``weights_only``) loading reads, or holds no ``state_dict``.
    """
    path = Path(checkpoint)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    if not path.is_file():
        hint = " (it is a directory: pass the .ckpt file inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as err:  # pickle, zip and storage errors have no common base class
        raise UnreadableCheckpointError(unreadable_checkpoint_message(path, err)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UnreadableCheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict' entry); found: {found}"
        )
    return ckpt


def unreadable_checkpoint_message(path: str | Path, error: BaseException) -> str:
    """Say why ``path`` could not be read as a checkpoint, and what to use instead.

    Never advises turning safe loading off: a checkpoint this package wrote holds only tensors
    and plain data.

    Args:
        path: The file.
        error: What ``torch.load(weights_only=True)`` raised.

    Returns:
        A one-paragraph message naming the file.
    """
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return (
            f"{path} is not a readable checkpoint: it holds pickled Python objects, which safe "
            "loading (weights_only=True) refuses to run. Checkpoints written by lightning-dino "
            "hold only tensors and plain data: use one of those."
        )
    return (
        f"{path} is not a readable checkpoint: the file is truncated or is not a PyTorch "
        f"checkpoint ({type(error).__name__}). An interrupted write never replaces a good "
        "checkpoint: use another file of the run's checkpoints folder (last.ckpt, "
        "epoch=*.ckpt)."
    )


def default_network(ckpt: dict[str, Any]) -> Which:
    """The network a checkpoint evaluates and exports by default.

    Checkpoints record it (``evaluated_network``, written by the method base); for older ones
    it is read from the state dict's keys.

    Args:
        ckpt: A checkpoint dictionary from :func:`read_checkpoint`.

    Returns:
        The recorded network; for an older checkpoint ``"ema"`` when it holds a student EMA (a
        :class:`~lightning_dino.Distillation` checkpoint), else ``"teacher"`` (DINO's).
    """
    recorded = ckpt.get("evaluated_network")
    if isinstance(recorded, str):
        return recorded
    distilled = any(key.startswith("ema.backbone.") for key in ckpt["state_dict"])
    return "ema" if distilled else "teacher"


def frozen_networks(ckpt: dict[str, Any]) -> list[str]:
    """The networks of a checkpoint that never trained (a distillation run's teacher).

    Recorded by the method base; for an older checkpoint, the teacher of a distillation run.
    """
    recorded = ckpt.get("frozen_networks")
    if isinstance(recorded, list):
        return [str(name) for name in recorded]
    return ["teacher"] if default_network(ckpt) == "ema" else []


def backbone_state_dict(
    ckpt: dict[str, Any], which: Which = "teacher", source: str | Path = "checkpoint"
) -> dict[str, Tensor]:
    """Take the backbone weights of one DINO network and strip their prefix.

    Args:
        ckpt: A checkpoint dictionary from :func:`read_checkpoint`.
        which: ``"teacher"``, ``"student"`` or ``"ema"``.
        source: Where ``ckpt`` came from, for error messages.

    Returns:
        The state dict of ``<which>.backbone`` with keys relative to the backbone.

    Raises:
        ValueError: If ``which`` is invalid, names the frozen teacher of a distillation run, or
            the checkpoint has no ``<which>.backbone.`` keys.
    """
    if which not in ("teacher", "student", "ema"):
        raise ValueError(f"which must be 'teacher', 'student' or 'ema', got {which!r}")
    if which in frozen_networks(ckpt):
        evaluated = default_network(ckpt)
        raise ValueError(
            f"{source} was trained against a frozen {which}: it is the network the run learned "
            f"from, not one it trained; use {setting('export', 'which', evaluated)} (the "
            "default) or 'student'"
        )
    prefix = f"{which}.backbone."
    state = ckpt["state_dict"]
    backbone = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not backbone:
        tops = sorted({key.split(".", 1)[0] for key in state})
        raise ValueError(
            f"{source} is not a lightning_dino DINO checkpoint: no '{prefix}*' weights among its "
            f"{len(state)} state_dict entries (top-level modules: {tops[:10]}). Pass a checkpoint "
            "written while training lightning_dino.DINO."
        )
    return backbone


def build_timm_backbone(hparams: dict[str, Any]) -> nn.Module:
    """Build the backbone architecture DINO trained, without stochastic depth.

    Args:
        hparams: The checkpoint's hyperparameters: the timm name ``backbone``, and
            ``backbone_kwargs`` and ``feature_grid`` when set.

    Returns:
        A randomly initialised timm model without classifier: the weights the run started from
        (``pretrained``, its file) are neither read nor needed, the checkpoint's replace them.
    """
    kwargs = {k: v for k, v in (hparams.get("backbone_kwargs") or {}).items()
              if k not in _START_WEIGHT_ARGS}
    return create_timm_backbone(
        hparams["backbone"],
        0.0,
        kwargs,
        int(hparams.get("feature_grid") or 0),
    )


def timm_model_args(
    model: nn.Module, backbone_kwargs: dict[str, Any] | None, architecture: str = ""
) -> dict[str, Any]:
    """The ``timm.create_model`` arguments (besides ``num_classes=0``) that rebuild ``model``.

    ``backbone_kwargs`` over the builder's defaults for the architecture (a DINOv3 model's class
    token pooling), plus ``dynamic_img_size=True`` when the DINO builder enabled it (the model
    keeps it as an attribute), minus drop rates, which only regularise training, and the start
    weights' source (``pretrained``, its file).

    Args:
        model: The backbone as :func:`build_timm_backbone` built it.
        backbone_kwargs: The checkpoint's ``backbone_kwargs`` hyperparameter.
        architecture: The timm model name.

    Returns:
        JSON-serialisable keyword arguments.
    """
    given = {**official_defaults(architecture), **(backbone_kwargs or {})}
    args = {k: v for k, v in given.items() if k not in (*_DROP_RATE_ARGS, *_START_WEIGHT_ARGS)}
    if getattr(model, "dynamic_img_size", False):
        args["dynamic_img_size"] = True
    return args


def _load_strict(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, explaining a mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the {what} does not fit the timm model rebuilt from its hyperparameters "
            f"(was backbone_kwargs changed, or timm upgraded?): {err}"
        ) from err


def _timm_config(
    model: nn.Module,
    architecture: str,
    backbone_kwargs: dict[str, Any] | None,
    ckpt: dict[str, Any],
) -> dict[str, Any]:
    """config.json content for a timm backbone, in timm's Hugging Face layout."""
    model_args = timm_model_args(model, backbone_kwargs, architecture)
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "model_args": model_args,
        "pretrained_cfg": _pretrained_cfg(model, model_args, ckpt),
    }
    grid = feature_grid_of(model)
    if grid:  # not a timm argument: load_backbone sets it again
        config["feature_grid"] = grid
    return config


def eval_preprocessing(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing of the run that wrote a checkpoint.

    Read from the data module's hyperparameters saved in the checkpoint (with a crop-size mix,
    its largest global size); with another data module, the size is the global crop size the
    module recorded from its batches.

    Args:
        ckpt: A checkpoint dictionary (see :func:`read_checkpoint`).

    Returns:
        ``size`` (``eval_size`` or ``global_crop_size``, None when unknown), ``resize``
        (``eval_resize`` or None), ``mean`` and ``std`` (ImageNet's when unknown).
    """
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    seen = (ckpt.get("crop_sizes") or {}).get("global")  # the module's record of its crops
    global_size = data.get("global_crop_size")
    if data.get("crop_size_mix"):  # a high-resolution phase: its largest global crops
        global_size = max(int(row[0]) for row in data["crop_size_mix"])
    return {
        "size": data.get("eval_size") or global_size or seen,
        "resize": data.get("eval_resize"),
        "mean": tuple(data.get("mean", IMAGENET_MEAN)),
        "std": tuple(data.get("std", IMAGENET_STD)),
    }


def _pretrained_cfg(
    model: nn.Module, model_args: dict[str, Any], ckpt: dict[str, Any]
) -> dict[str, Any]:
    """The timm preprocessing config: DINO's eval transform and the training normalisation.

    Size, crop and normalisation come from the data module's hyperparameters when the
    checkpoint has them (``eval_size`` or ``global_crop_size``, ``eval_resize``, ``mean``,
    ``std``), else from ``img_size`` / timm's default config and ImageNet statistics.
    """
    default = dict(getattr(model, "pretrained_cfg", None) or {})
    channels, *default_size = default.get("input_size", (3, 224, 224))
    data = eval_preprocessing(ckpt)
    size = data["size"] or model_args.get("img_size")
    if size is None:
        height_width = list(default_size)
    else:
        height_width = [size, size] if isinstance(size, int) else list(size)
    resize = data["resize"]
    return {
        **{key: default[key] for key in _PRETRAINED_CFG_KEYS if key in default},
        "num_classes": 0,
        "input_size": [model_args.get("in_chans", channels), *height_width],
        "fixed_input_size": bool(default.get("fixed_input_size", False))
        and not model_args.get("dynamic_img_size", False),
        "interpolation": "bicubic",
        "crop_pct": min(height_width) / resize if resize else 0.875,
        "crop_mode": "center",
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "custom_load": False,
    }


def _custom_module_config(ckpt: dict[str, Any], which: Which) -> dict[str, Any]:
    """config.json content for a backbone that was an arbitrary ``nn.Module``."""
    head_input = ckpt["state_dict"].get(f"{which}.head.mlp.0.weight")
    return {
        "architecture": None,
        "num_features": None if head_input is None else int(head_input.shape[1]),
        "model_args": {},
    }


def _export_call(which: Which | None = None) -> str:
    """How to export ``which`` backbone: the command under the CLI, else the Python call."""
    if using_cli():
        option = f" --which {which}" if which else ""
        return f"lightning-dino export --ckpt RUN.ckpt --out DIR{option}"
    argument = f", which={which!r}" if which else ""
    return f"export_backbone('RUN.ckpt', 'DIR'{argument})"


def _custom_module_hint(out_dir: Path) -> str:
    """How to load weights exported from a custom-module backbone."""
    return (
        "The checkpoint's backbone was a custom nn.Module, not a timm model name, so config.json "
        "has architecture: null. Build the same module yourself and load the weights with "
        "`module.load_state_dict(safetensors.torch.load_file("
        f"'{out_dir / WEIGHTS_NAME}'))`."
    )


def _load_export(directory: Path, which: Which | None) -> nn.Module:
    """Load an export directory with plain timm."""
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{directory} is not a backbone export: {file.name} is missing. Create one with "
                f"`{_export_call()}`."
            )
    config = json.loads(config_file.read_text())
    if which is not None and config.get("source") != which:
        raise ValueError(
            f"{directory} holds the {config.get('source')} backbone, not the {which}; export the "
            f"{which} with `{_export_call(which)}` or pass "
            f"{setting('load_backbone', 'which', config.get('source'))}"
        )
    if config.get("architecture") is None:
        raise ValueError(f"{directory} has no timm architecture. {_custom_module_hint(directory)}")
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(weights_file), "num_classes": 0, "custom_load": False},
        num_classes=0,
        **config["model_args"],
    )
    grid = int(config.get("feature_grid") or 0)
    return use_grid_pooling(model, grid) if grid else model
