"""The DINO projection head: MLP, L2-normalised bottleneck, weight-normalised prototypes.

Reference: Caron et al. 2021, section 3.1 and Appendix C; `DINOHead` in facebookresearch/dino
`vision_transformer.py`; DINOv3's variant without weight norm in facebookresearch/dinov3
`dinov3/layers/dino_head.py`.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """Projection head mapping backbone features to K prototype logits.

    ``n_layers`` Linear layers with GELU (and optional BatchNorm) in between map ``in_dim`` to a
    ``bottleneck_dim`` vector, which is L2-normalised and fed to a weight-normalised Linear layer
    without bias (the prototypes). The weight-norm magnitude starts at 1; with
    ``norm_last_layer=True`` it stays fixed at 1 (frozen), so the logits are cosine similarities.

    Args:
        in_dim: Backbone feature dimension.
        out_dim: Number of prototypes K.
        hidden_dim: Width of the hidden layers.
        bottleneck_dim: Dimension of the L2-normalised bottleneck.
        n_layers: Number of Linear layers before the bottleneck (>= 1).
        use_bn: Insert BatchNorm1d after each hidden Linear layer.
        norm_last_layer: Freeze the weight-norm magnitude of the last layer at 1 (with
            ``weight_norm`` only).
        weight_norm: Weight-normalise the last layer (DINO, DINOv2). False makes it a plain
            ``Linear`` without bias, initialised like the MLP (truncated normal, std 0.02), as
            DINOv3's ``dinov3/layers/dino_head.py``.

    Examples:
        >>> head = DINOHead(in_dim=384, out_dim=1024)
        >>> head(torch.randn(8, 384)).shape
        torch.Size([8, 1024])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if out_dim < 2:
            raise ValueError(f"out_dim must be >= 2, got {out_dim}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        if not weight_norm:  # DINOv3: a plain Linear, initialised like the MLP
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            _init_linear(self.last_layer)
            return
        self.last_layer = parametrized_weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Project features to prototype logits.

        Args:
            x: Backbone features, shape (B, in_dim).

        Returns:
            Logits of shape (B, out_dim).
        """
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def head_arguments(hparams: Any) -> dict[str, Any]:
    """:class:`DINOHead`'s arguments (but ``in_dim``) from a method's hyperparameters.

    Args:
        hparams: ``out_dim``, ``hidden_dim``, ``bottleneck_dim``, ``n_head_layers``,
            ``use_bn_in_head``, ``norm_last_layer`` and ``head_weight_norm`` (the last four
            optional: 3, False, True, True).

    Returns:
        ``{"out_dim", "hidden_dim", "bottleneck_dim", "n_layers", "use_bn", "norm_last_layer",
        "weight_norm"}``.
    """
    return {
        "out_dim": hparams["out_dim"],
        "hidden_dim": hparams["hidden_dim"],
        "bottleneck_dim": hparams["bottleneck_dim"],
        "n_layers": hparams.get("n_head_layers", 3),
        "use_bn": hparams.get("use_bn_in_head", False),
        "norm_last_layer": hparams.get("norm_last_layer", True),
        "weight_norm": hparams.get("head_weight_norm", True),
    }
