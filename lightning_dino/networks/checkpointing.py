"""Activation checkpointing of a student backbone: its blocks' activations recomputed in backward.

A transformer block (ViT, Eva/DINOv3) or a residual block (ResNet) keeps only its input for the
backward pass and runs its forward again there: the activations of one block at a time are held
instead of all of them, for about a third more compute. timm's models carry the switch
(``set_grad_checkpointing``; DINOv3 checkpoints per block the same way). Randomness inside a block
(stochastic depth, DINOv3's RoPE rescaling) is replayed: ``torch.utils.checkpoint`` restores the
random state before the recomputation, so the gradients are those of the plain backbone. One
difference remains: a BatchNorm inside a checkpointed block updates its running statistics again
in the recomputation (twice per step); the gradients and the batch statistics are unchanged.
"""

from __future__ import annotations

from torch import nn

from lightning_dino.setting_names import setting


def use_activation_checkpointing(backbone: nn.Module, owner: object = "model") -> nn.Module:
    """Checkpoint ``backbone``'s blocks (or stages) in training, in place.

    Args:
        backbone: A timm model, or a module holding one (the outermost module with
            ``set_grad_checkpointing`` gets it).
        owner: The method, for the name of the option in messages.

    Returns:
        ``backbone``, whose forward now recomputes each block's activations in backward.

    Raises:
        ValueError: When no module of ``backbone`` has ``set_grad_checkpointing``.
    """
    switch = next(
        (m for m in backbone.modules() if callable(getattr(m, "set_grad_checkpointing", None))),
        None,
    )
    if switch is None:
        raise ValueError(
            f"{setting(owner, 'activation_checkpointing', True)} needs a backbone with timm's "
            f"set_grad_checkpointing; {type(backbone).__name__} has none. Use a timm backbone by "
            "name, or wrap your blocks' calls in torch.utils.checkpoint.checkpoint(..., "
            f"use_reentrant=False) and pass {setting(owner, 'activation_checkpointing', False)}"
        )
    switch.set_grad_checkpointing(True)
    return backbone
