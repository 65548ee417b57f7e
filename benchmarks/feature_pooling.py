"""k-NN of a teacher's last features pooled several ways (CNN feature map or ViT tokens).

A DINO backbone's features are its pooled output, so how the last feature map is pooled decides
what the k-NN sees. On small, centred images (Fashion-MNIST) the position of a part matters:
average pooling throws it away, max pooling keeps the strongest response per channel, a g x g
grid (``feature_grid: g``) keeps it coarsely and the flattened map keeps all of it. A CNN's map
is pooled four ways (avg, max, grid, flatten); a ViT's tokens five (its class token, the average
patch token, the g x g grid of patch tokens, the class token followed by that grid as with
``feature_grid: g``, and the flattened patch tokens). g is ``--grid``, by default the backbone's
own ``feature_grid`` (2 when it has none). Measured on the same weights (a run's checkpoint, or
the backbone at random initialisation with ``--random-init``), with the DINO k-NN protocol
(k=20, T=0.07, cosine; train split as memory bank, test split as queries).

Example:
    python benchmarks/feature_pooling.py --config configs/fashion_mnist_cpu.yaml \
        --ckpt runs/bench_cpu/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lightning_dino.cli import train
from lightning_dino.eval.knn import knn_accuracy
from lightning_dino.io.export import load_backbone
from lightning_dino.networks.backbones import GridPool, TokenGridPool, feature_grid_of, is_vit


def cnn_pools(grid: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """Poolings of a CNN's last map (B, C, H, W)."""
    return {
        "avg": lambda f: f.mean((2, 3)),
        "max": lambda f: f.amax((2, 3)),
        f"grid{grid}": GridPool(grid),
        "flatten": lambda f: f.flatten(1),
    }


def vit_pools(grid: int, num_prefix_tokens: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """Poolings of a ViT's final-norm tokens (B, P + h*h, C), class token first."""
    with_class_token = TokenGridPool(grid, num_prefix_tokens)
    return {
        "cls": lambda t: t[:, 0],
        "avg": lambda t: t[:, num_prefix_tokens:].mean(1),
        f"grid{grid}": lambda t: with_class_token(t)[:, t.shape[-1] :],  # drop the class token
        f"cls+grid{grid}": with_class_token,
        "flatten": lambda t: t[:, num_prefix_tokens:].flatten(1),
    }


def pooled_features(
    backbone: nn.Module, loader: DataLoader, grid: int = 2
) -> tuple[dict[str, Tensor], Tensor]:
    """Pool the last features of a timm CNN (four ways) or ViT (five ways).

    Args:
        backbone: A timm CNN whose ``forward_features`` returns (B, C, H, W), or a timm ViT
            whose ``forward_features`` returns (B, P + h*h, C) tokens.
        loader: Yields ``(images, labels)``.
        grid: Side g of the grid poolings.

    Returns:
        ``({pooling name: (N, D)}, labels (N,))``; a CNN's are ``avg`` (C), ``max`` (C),
        ``grid{g}`` (C*g*g), ``flatten`` (C*H*W), a ViT's ``cls`` (C), ``avg`` (C), ``grid{g}``
        (C*g*g), ``cls+grid{g}`` (C*(1+g*g)), ``flatten`` (C*h*h).
    """
    vit = is_vit(backbone)
    pools = vit_pools(grid, backbone.num_prefix_tokens) if vit else cnn_pools(grid)
    out: dict[str, list[Tensor]] = {name: [] for name in pools}
    labels = []
    backbone.eval()
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="features", leave=False):
            fmap = backbone.forward_features(images)
            if fmap.ndim != (3 if vit else 4):
                raise ValueError(f"forward_features returned an unexpected shape {tuple(fmap.shape)}")
            for name, pool in pools.items():
                out[name].append(pool(fmap).float())
            labels.append(targets)
    return {name: torch.cat(chunks) for name, chunks in out.items()}, torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's fit config (for the data)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a DINO checkpoint; its teacher backbone is measured")
    source.add_argument("--random-init", action="store_true", help="the config's backbone, untrained")
    parser.add_argument(
        "--grid", type=int, help="grid side g (default: the backbone's feature_grid, else 2)"
    )
    args, overrides = parser.parse_known_args()
    if args.grid is not None and args.grid < 1:
        parser.error(f"--grid must be a positive grid side, got {args.grid}")

    cli = train(["--config", args.config, "--trainer.logger=false", *overrides], run=False)
    backbone = cli.model.teacher.backbone if args.random_init else load_backbone(args.ckpt)
    grid = args.grid or feature_grid_of(backbone) or 2
    cli.datamodule.setup("fit")
    bank, bank_labels = pooled_features(backbone, cli.datamodule.knn_train_dataloader(), grid)
    queries, query_labels = pooled_features(backbone, cli.datamodule.knn_val_dataloader(), grid)
    which = "random init" if args.random_init else args.ckpt
    for name in bank:
        top1, _ = knn_accuracy(bank[name], bank_labels, queries[name], query_labels)
        print(f"{which} | {name:9s} pooling | dim {bank[name].shape[1]:5d} | k-NN top1 {100 * top1:.2f}%")


if __name__ == "__main__":
    main()
