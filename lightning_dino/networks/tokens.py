"""One token forward for every timm ViT family, masked or not, through the backbone's own call.

timm's ``VisionTransformer`` (with or without register tokens, as timm builds DINO and DINOv2)
and ``Eva`` (rotary position embeddings, registers and LayerScale, as timm builds DINOv3) both run
``patch_embed -> position embedding -> blocks -> norm`` in ``forward_features`` and pool in
``forward_head``. :func:`token_forward` runs the backbone as a module call, ``vit(images)``, with
two temporary hooks: one on ``patch_embed`` that replaces the embeddings of masked patches by the
mask token (before the position embedding or the rotary positions, as iBOT, DINOv2 and DINOv3
do), and one on ``norm`` that keeps its output, the tokens. Nothing outside the backbone's own
forward touches its parts, so a backbone whose submodules are sharded (FSDP2 hooks fire on module
calls) serves it, and the pooled features are exactly the backbone's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dino.setting_names import setting


def token_problem(backbone: nn.Module) -> str | None:
    """Why :func:`token_forward` cannot serve ``backbone``, or None when it can.

    It needs a ViT with a ``patch_embed`` module, ``blocks``, a final ``norm`` module (an
    ``nn.Identity`` counts), an integer ``num_prefix_tokens`` and ``embed_dim``.
    """
    missing = [
        name for name, ok in (
            ("patch_embed", isinstance(getattr(backbone, "patch_embed", None), nn.Module)),
            ("blocks", hasattr(backbone, "blocks")),
            ("norm", isinstance(getattr(backbone, "norm", None), nn.Module)),
            ("num_prefix_tokens", isinstance(getattr(backbone, "num_prefix_tokens", None), int)),
            ("embed_dim", isinstance(getattr(backbone, "embed_dim", None), int)),
        ) if not ok
    ]
    if not missing:
        return None
    return (
        f"{type(backbone).__name__} is not a timm ViT whose tokens can be read (it has no "
        f"{', '.join(missing)}); use a timm VisionTransformer or Eva, such as "
        "vit_small_patch16_224, vit_small_patch14_reg4_dinov2 or vit_small_patch16_dinov3"
    )


def check_token_backbone(backbone: nn.Module, owner: object, option: str) -> None:
    """Raise, naming the option that needs them, when the backbone's tokens cannot be read.

    Args:
        backbone: The student backbone.
        owner: The method, for the name in the message.
        option: The argument that needs the tokens (``"ibot_loss_weight"``...).

    Raises:
        ValueError: ``DINO(ibot_loss_weight=...) needs patch tokens: ResNet is not a timm
            ViT...``.
    """
    problem = token_problem(backbone)
    if problem is not None:
        raise ValueError(
            f"{setting(owner, option)} needs patch tokens: {problem}; or "
            f"{setting(owner, option, 0)}"
        )


def token_forward(
    vit: nn.Module,
    images: Tensor,
    masks: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A timm ViT's pooled features and its output tokens, masked patches replaced first.

    With nothing masked, the tokens are exactly ``vit.forward_features(images)`` and the pooled
    features ``vit(images)``.

    Args:
        vit: A timm ``VisionTransformer`` or ``Eva`` without classifier (see
            :func:`token_problem`).
        images: (B, C, H, W).
        masks: Optional boolean (B, N) over the N patches, row-major; True patches become
            ``mask_token``.
        mask_token: (1, D) embedding of masked patches (needed with ``masks``).

    Returns:
        ``(pooled (B, D'), tokens (B, num_prefix_tokens + N, D))``; D' is the backbone's
        feature width (D, or more with grid pooling).

    Raises:
        ValueError: For ``masks`` without ``mask_token``.
    """
    if masks is not None and mask_token is None:
        raise ValueError("masked patches need a mask_token")
    captured: list[Tensor] = []

    def keep_tokens(module: nn.Module, args: Any, output: Tensor) -> None:
        captured.append(output)

    def mask_patches(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        # (B, N, D), or (B, h, w, D) from a patch embedding built for dynamic image sizes.
        selected = masks.reshape(output.shape[:-1]).unsqueeze(-1)
        return torch.where(selected, mask_token.to(output.dtype).reshape(-1), output)

    masking = mask_patches if masks is not None else None
    with _eager_if_compiled(vit), _hooks(vit.norm, keep_tokens), _hooks(vit.patch_embed, masking):
        pooled = vit(images)
    return pooled, captured[-1]


def _eager_if_compiled(module: nn.Module) -> Any:
    """Run a module compiled in place eagerly: hooks added per call would recompile it."""
    if getattr(module, "_compiled_call_impl", None) is None:
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


@contextmanager
def _hooks(module: nn.Module, hook: Any) -> Iterator[None]:
    """Register a forward hook on ``module`` for the ``with`` block (none when ``hook`` is None)."""
    handle = None if hook is None else module.register_forward_hook(hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
