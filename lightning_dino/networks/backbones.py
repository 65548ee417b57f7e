"""Backbones by timm name (or any ``nn.Module``) and the multi-crop student/teacher network."""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_dino.networks.checkpointing import use_activation_checkpointing
from lightning_dino.networks.head import DINOHead
from lightning_dino.networks.tokens import token_forward
from lightning_dino.setting_names import setting


def _local_weights_as_state_dict(extra: dict[str, Any]) -> dict[str, Any]:
    """Load a local ``.safetensors`` / ``.pth`` weights file as a state dict.

    Some timm models' default weights are JAX ``.npz`` files (``custom_load`` in their
    pretrained config, e.g. the ViT AugReg tags); timm before 1.0.31 parses any local
    ``pretrained_cfg_overlay: {file: ...}`` of such a model as ``.npz`` and fails on a PyTorch
    file. A file that is not ``.npz`` gets ``custom_load: False`` unless the caller set it.
    """
    overlay = extra.get("pretrained_cfg_overlay")
    if not isinstance(overlay, dict) or "file" not in overlay or "custom_load" in overlay:
        return extra
    if str(overlay["file"]).endswith(".npz"):
        return extra
    return {**extra, "pretrained_cfg_overlay": {**overlay, "custom_load": False}}


def official_defaults(name: str) -> dict[str, Any]:
    """``timm.create_model`` arguments that make a timm model what its authors trained.

    timm builds its DINOv3 ports (``*_dinov3*``, timm ``Eva``) with average pooling; DINOv3's
    own models give (and are evaluated on) the class token: ``global_pool="token"``.

    Args:
        name: The timm model name.

    Returns:
        The arguments (empty for every other model); the user's ``backbone_kwargs`` win.
    """
    return {"global_pool": "token"} if "_dinov3" in name else {}


def _timm_kwargs(name: str, drop_path_rate: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Candidate keyword sets for ``timm.create_model``, most specific first."""
    extra = {**official_defaults(name), **extra}
    base = {"pretrained": False, "num_classes": 0, **_local_weights_as_state_dict(extra)}
    with_dpr = {**base, "drop_path_rate": drop_path_rate} if "drop_path_rate" not in extra else base
    candidates = [with_dpr, base]
    if "dynamic_img_size" not in extra:
        candidates.insert(0, {**with_dpr, "dynamic_img_size": True})
    return candidates


def create_timm_backbone(
    name: str,
    drop_path_rate: float = 0.0,
    backbone_kwargs: dict[str, Any] | None = None,
    feature_grid: int = 0,
    owner: object = "model",
) -> nn.Module:
    """Create a timm model without classifier that returns pooled features (B, D).

    ViTs (and any model that accepts it) get ``dynamic_img_size=True`` so global and local crops
    of different sizes go through the same network with interpolated position embeddings.
    ``drop_path_rate`` is passed when the model accepts it. DINOv3 models give their class token
    (:func:`official_defaults`). Weights are never downloaded.

    Args:
        name: A timm model name, e.g. ``"vit_small_patch16_224"`` or ``"resnet50"``.
        drop_path_rate: Stochastic depth rate (0.1 for the DINO student, 0 for the teacher).
        backbone_kwargs: Extra keyword arguments for ``timm.create_model`` (``img_size``,
            ``patch_size``, ``depth``, ``in_chans``...).
        feature_grid: 0 keeps the model's own pooling; g > 0 keeps a coarse layout (see
            :func:`use_grid_pooling`): a CNN's last map averaged to a g x g grid and flattened,
            a ViT's class token followed by its patch tokens averaged to a g x g grid.
        owner: The method the backbone is for, to name its settings in messages.

    Returns:
        The backbone module.

    Raises:
        ValueError: When timm does not know ``name``; the message lists close matches.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"{setting(owner, 'backbone')}: unknown timm model {name!r}.{hint} "
            "List all with `python -c 'import timm; print(timm.list_models())'`."
        )
    errors = []
    for kwargs in _timm_kwargs(name, drop_path_rate, dict(backbone_kwargs or {})):
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as err:  # the model does not take one of the optional arguments
            errors.append(str(err))
            continue
        return use_grid_pooling(model, feature_grid, owner) if feature_grid else model
    raise TypeError(f"could not create timm model {name!r}: {errors[-1]}")


class GridPool(nn.Module):
    """Average-pool a feature map to a fixed ``grid x grid`` and flatten it, keeping the layout.

    Global average pooling discards where a part is; on small, centred images (Fashion-MNIST,
    digits) that position is what tells classes apart. Crops of any size give the same output
    size, so global and local crops share the head.

    Args:
        grid: Output cells per side.
    """

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, fmap: Tensor) -> Tensor:
        """Pool (B, C, H, W) to (B, C * grid * grid), channel-major."""
        return F.adaptive_avg_pool2d(fmap, self.grid).flatten(1)


class TokenGridPool(GridPool):
    """A ViT's class token next to its patch tokens averaged to a ``grid x grid`` layout.

    The ViT counterpart of :class:`GridPool`: the class token stays the first part of the
    features (so the attention maps of the class token still belong to what is trained), and the
    patch tokens, laid out as their square map, add where each part is.

    Args:
        grid: Output cells per side.
        num_prefix_tokens: Tokens before the patches (class and register tokens).
    """

    def __init__(self, grid: int, num_prefix_tokens: int) -> None:
        super().__init__(grid)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        """Pool (B, P + h*h, C) tokens to (B, C * (1 + grid * grid)): class token, then the grid."""
        patches = tokens[:, self.num_prefix_tokens :]
        batch, n_patches, channels = patches.shape
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(
                f"{setting('model', 'feature_grid')} with a ViT needs square crops; got "
                f"{n_patches} patch tokens"
            )
        fmap = patches.transpose(1, 2).reshape(batch, channels, side, side)
        return torch.cat([tokens[:, 0], super().forward(fmap)], dim=1)


def use_grid_pooling(backbone: nn.Module, grid: int, owner: object = "model") -> nn.Module:
    """Make a timm model's features keep a coarse ``grid x grid`` layout, in place.

    A CNN's ``global_pool`` becomes :class:`GridPool`; a ViT with a class token pools with
    :class:`TokenGridPool` (class token + patch-token grid). The parameters and their names do
    not change (the pools have none), so checkpoints and exports load into the plain timm model;
    only the pooling must be set again after loading.

    Args:
        backbone: A timm CNN with a ``global_pool`` module and ``num_features`` (ResNet family),
            or a timm VisionTransformer with a class token and no attention pooling.
        grid: Output cells per side (>= 1).
        owner: The method, to name ``feature_grid`` in messages.

    Returns:
        ``backbone``, whose output is now (B, num_features * grid * grid) for a CNN and
        (B, embed_dim * (1 + grid * grid)) for a ViT.

    Raises:
        ValueError: If ``grid`` < 1 or the model has no pooling this can replace.
    """
    if grid < 1:
        raise ValueError(
            f"{setting(owner, 'feature_grid')} must be >= 1 (or 0 for the model's pooling), "
            f"got {grid}"
        )
    if is_vit(backbone):
        has_class_token = getattr(backbone, "cls_token", None) is not None
        if not has_class_token or getattr(backbone, "attn_pool", 0) is not None:
            raise ValueError(
                f"{setting(owner, 'feature_grid')} needs a ViT with a class token and no "
                f"attention pooling (global_pool: token); {type(backbone).__name__} is not one. "
                f"Use {setting(owner, 'feature_grid', 0)}."
            )
        # timm's VisionTransformer.pool hands every token to attn_pool when it is set
        backbone.attn_pool = TokenGridPool(grid, backbone.num_prefix_tokens)
        backbone.pool_include_prefix = True
        backbone.num_features = backbone.embed_dim * (1 + grid * grid)
        return backbone
    if not isinstance(getattr(backbone, "global_pool", None), nn.Module):
        raise ValueError(
            f"{setting(owner, 'feature_grid')} needs a CNN with a `global_pool` module (timm "
            f"ResNet family) or a timm ViT; {type(backbone).__name__} has neither. Use "
            f"{setting(owner, 'feature_grid', 0)}."
        )
    channels = backbone.num_features
    backbone.global_pool = GridPool(grid)
    backbone.num_features = channels * grid * grid
    return backbone


def use_standard_pooling(backbone: nn.Module) -> nn.Module:
    """Undo :func:`use_grid_pooling` in place: the paper's features, for its evaluation protocol.

    A CNN pools its last map with global average pooling again, a ViT gives its class token.
    A backbone without grid pooling is returned unchanged.

    Args:
        backbone: A timm model, grid-pooled or not.

    Returns:
        ``backbone``, whose output is (B, num_features) of the plain timm model.
    """
    grid = feature_grid_of(backbone)
    if not grid:
        return backbone
    if isinstance(getattr(backbone, "attn_pool", None), TokenGridPool):
        backbone.attn_pool = None
        backbone.pool_include_prefix = False
        backbone.global_pool = "token"
        backbone.num_features = backbone.embed_dim
        return backbone
    backbone.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
    backbone.num_features = backbone.num_features // (grid * grid)
    return backbone


def feature_grid_of(backbone: nn.Module) -> int:
    """The ``grid`` set by :func:`use_grid_pooling` on ``backbone``, 0 when it was not used."""
    for pool in (getattr(backbone, "global_pool", None), getattr(backbone, "attn_pool", None)):
        if isinstance(pool, GridPool):
            return pool.grid
    return 0


def feature_width(vit: nn.Module) -> int:
    """Width of a ViT's tokens (``embed_dim``), as opposed to its pooled feature dimension."""
    width = getattr(vit, "embed_dim", None)
    if not isinstance(width, int):
        raise ValueError(
            f"a mask token needs a timm ViT backbone (patch tokens and an embed_dim), not "
            f"{type(vit).__name__}"
        )
    return width


def feature_dim(backbone: nn.Module, owner: object = "model") -> int:
    """Output feature dimension of a backbone: ``num_features`` or ``embed_dim``, else probed.

    Args:
        backbone: A module mapping (B, C, H, W) images to (B, D) features.
        owner: The method, to name ``backbone_dim`` in messages.

    Returns:
        D.
    """
    for attr in ("num_features", "embed_dim"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    was_training = backbone.training
    try:
        with torch.no_grad():
            out = backbone.eval()(torch.zeros(2, 3, 224, 224))
    except Exception as err:  # any error of the user's module
        raise ValueError(
            "cannot find the feature width of the backbone module: it has no integer "
            "num_features / embed_dim attribute, and running it on a 224x224 image failed "
            f"({type(err).__name__}: {err}). Give the module a num_features attribute or pass "
            f"{setting(owner, 'backbone_dim')}"
        ) from err
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"the backbone must return (B, D) features, got shape {tuple(out.shape)}")
    return int(out.shape[1])


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a ViT-like model (has ``patch_embed`` and ``blocks``)."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


class MultiCropNetwork(nn.Module):
    """Backbone + DINO head that runs a list of crops with one backbone call per resolution.

    Consecutive crops of the same size are concatenated along the batch and go through the
    backbone together (two calls for 224 + 96 px crops), then all features go through the head in
    one call. The output is crop-major, as the loss expects.

    Args:
        backbone: Feature extractor mapping (B, C, H, W) to (B, D).
        head: The projection head.
        mask_token: Learn an iBOT mask token.
        patch_head: A separate head for the iBOT patch tokens (DINOv2's ``separate_head``);
            None projects them with ``head``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: DINOHead,
        mask_token: bool = False,
        patch_head: DINOHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        if patch_head is not None:
            self.patch_head = patch_head
        if mask_token:  # iBOT: replaces the student's masked patch embeddings (zeros, as DINOv2)
            self.mask_token = nn.Parameter(torch.zeros(1, feature_width(backbone)))

    def forward(self, crops: list[Tensor]) -> Tensor:
        """Project every crop.

        Args:
            crops: List of n_crops tensors of shape (B, C, H_i, W_i), crop-major.

        Returns:
            Logits of shape (n_crops, B, K).
        """
        return self.forward_with_features(crops)[0]

    def forward_with_features(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Project every crop and keep the backbone features too (for KoLeo).

        Args:
            crops: List of n_crops tensors of shape (B, C, H_i, W_i), crop-major.

        Returns:
            ``(logits (n_crops, B, K), features (n_crops, B, D))``.
        """
        batch = crops[0].shape[0]
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = crops[start] if end == start + 1 else torch.cat(crops[start:end])
            features.append(self.backbone(group))
            start = end
        flat = torch.cat(features) if len(features) > 1 else features[0]
        logits = self.head(flat)
        return logits.reshape(len(crops), batch, -1), flat.reshape(len(crops), batch, -1)

    def forward_masked(
        self, crops: list[Tensor], n_global: int, masks: Tensor, mask_input: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The iBOT forward: global crops token by token, with (or only read at) masked patches.

        Args:
            crops: Crop-major list; the first ``n_global`` are the global crops (B, C, H, W).
            n_global: Number of global crops.
            masks: Boolean (n_global * B, N) patch masks, crop-major like the crops.
            mask_input: Replace the masked patch embeddings with ``mask_token`` (the student) or
                leave the input whole (the teacher).

        Returns:
            ``(logits (n_crops, B, K), masked patch logits (M, K), features (n_crops, B, D),
            global patch tokens (n_global * B, N, D))``, M = ``masks.sum()``, the patches in
            ``masks.nonzero()`` order. Local crops go through :meth:`forward_with_features`.
        """
        vit = self.backbone
        batch = crops[0].shape[0]
        images = torch.cat(crops[:n_global])
        masked = masks if mask_input else None
        features, tokens = token_forward(vit, images, masked, self._mask_token())
        patch_tokens = tokens[:, vit.num_prefix_tokens :]
        patches = patch_tokens[masks]  # (M, D)
        if hasattr(self, "patch_head"):
            logits = self.head(features).reshape(n_global, batch, -1)
            patch_logits = self.patch_head(patches)
        else:
            head_out = self.head(torch.cat([features, patches]))
            logits = head_out[: len(features)].reshape(n_global, batch, -1)
            patch_logits = head_out[len(features) :]
        features = features.reshape(n_global, batch, -1)
        if len(crops) > n_global:
            local_logits, local_features = self.forward_with_features(crops[n_global:])
            logits = torch.cat([logits, local_logits])
            features = torch.cat([features, local_features])
        return logits, patch_logits, features, patch_tokens

    def _mask_token(self) -> Tensor | None:
        return getattr(self, "mask_token", None)


def build_student_teacher(
    backbone: str | nn.Module,
    head_kwargs: dict[str, Any],
    drop_path_rate: float = 0.1,
    backbone_kwargs: dict[str, Any] | None = None,
    feature_grid: int = 0,
    backbone_dim: int | None = None,
    mask_token: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    activation_checkpointing: bool = False,
    patch_head_kwargs: dict[str, Any] | None = None,
    check_backbone: Callable[[nn.Module, int], None] | None = None,
    owner: object = "model",
) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Build the student and a separate teacher with the same initial weights.

    The teacher is a distinct module (never the student object), built without stochastic depth,
    loaded with the student's weights and frozen (``requires_grad=False``).

    Args:
        backbone: A timm model name or a module returning (B, D) features (deep-copied for the
            teacher; its own drop-path settings are kept as given).
        head_kwargs: Keyword arguments of :class:`DINOHead` except ``in_dim``.
        drop_path_rate: Stochastic depth of the student backbone (timm names only).
        backbone_kwargs: Extra ``timm.create_model`` arguments (timm names only).
        feature_grid: See :func:`create_timm_backbone` (timm names only).
        backbone_dim: The backbone's feature width, when :func:`feature_dim` cannot find it.
        mask_token: Give both networks an iBOT mask token (a ViT whose pooled features are
            token-wide, so that the head takes class and patch tokens alike).
        channels_last: Keep convolutional backbones' weights channels-last (ViTs are left).
        compile: ``torch.compile`` both backbones in place (checkpoint keys do not change).
        activation_checkpointing: Recompute the student backbone's block activations in backward
            (:func:`~lightning_dino.networks.checkpointing.use_activation_checkpointing`).
        patch_head_kwargs: Give both networks a separate :class:`DINOHead` for the iBOT patch
            tokens, with these arguments (except ``in_dim``); None: one head for both.
        check_backbone: Called with the student backbone and its feature width D once they are
            built, before the heads: raises when the method's loss terms cannot use it.
        owner: The method, to name its settings in messages.

    Returns:
        ``(student, teacher)``.
    """
    if isinstance(backbone, str):
        student_backbone = create_timm_backbone(
            backbone, drop_path_rate, backbone_kwargs, feature_grid, owner
        )
        teacher_backbone = create_timm_backbone(backbone, 0.0, backbone_kwargs, feature_grid, owner)
    elif feature_grid:
        raise ValueError(
            f"{setting(owner, 'feature_grid')} applies to timm backbones given by name; for "
            "your own module, pool inside it (e.g. "
            "lightning_dino.networks.backbones.use_grid_pooling) "
            f"and pass {setting(owner, 'feature_grid', 0)}"
        )
    else:
        student_backbone = backbone
        teacher_backbone = copy.deepcopy(backbone)
    in_dim = backbone_dim or feature_dim(student_backbone, owner)
    if check_backbone is not None:
        check_backbone(student_backbone, in_dim)

    def network(backbone: nn.Module, frozen_norm: bool) -> MultiCropNetwork:
        # The teacher's heads are built with the default (frozen) norm; the EMA sets their values.
        extra = {"norm_last_layer": True} if frozen_norm else {}
        head = DINOHead(in_dim, **{**head_kwargs, **extra})
        patch_head = None
        if patch_head_kwargs is not None:
            patch_head = DINOHead(in_dim, **{**patch_head_kwargs, **extra})
        return MultiCropNetwork(backbone, head, mask_token, patch_head)

    student = network(student_backbone, frozen_norm=False)
    teacher = network(teacher_backbone, frozen_norm=True)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if activation_checkpointing:
        use_activation_checkpointing(student.backbone, owner)
    for built in (student, teacher):
        if channels_last and not is_vit(built.backbone):
            built.backbone.to(memory_format=torch.channels_last)
        if compile:
            built.backbone.compile(dynamic=False)
    return student, teacher
