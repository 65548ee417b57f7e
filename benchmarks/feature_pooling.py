"""k-NN of a CNN teacher's last feature map pooled four ways: average, max, 2x2 grid, flattened.

A DINO backbone's features are its pooled output, so how the last feature map is pooled decides
what the k-NN sees. On small, centred images (Fashion-MNIST) the position of a part matters:
average pooling throws it away, max pooling keeps the strongest response per channel, the 2x2
grid (``feature_grid: 2``) keeps it coarsely and the flattened map keeps all of it. This script
measures the four on the same weights (a run's checkpoint, or the backbone at random
initialisation with ``--random-init``), with the DINO k-NN protocol (k=20, T=0.07, cosine; train
split as memory bank, test split as queries).

Example:
    python benchmarks/feature_pooling.py --config configs/fashion_mnist_cpu.yaml \
        --ckpt runs/bench_cpu/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lightning_dino.backbones import GridPool
from lightning_dino.cli import train
from lightning_dino.eval.knn import knn_accuracy
from lightning_dino.export import load_backbone

POOLINGS = ("avg", "max", "grid2", "flatten")


def pooled_features(backbone: nn.Module, loader: DataLoader) -> tuple[dict[str, Tensor], Tensor]:
    """Pool the last feature map (B, C, H, W) of a timm CNN four ways.

    Args:
        backbone: A timm model with ``forward_features`` returning (B, C, H, W).
        loader: Yields ``(images, labels)``.

    Returns:
        ``({"avg": (N, C), "max": (N, C), "grid2": (N, 4C), "flatten": (N, C*H*W)}, labels (N,))``.
    """
    pools = {
        "avg": lambda f: f.mean((2, 3)),
        "max": lambda f: f.amax((2, 3)),
        "grid2": GridPool(2),
        "flatten": lambda f: f.flatten(1),
    }
    out: dict[str, list[Tensor]] = {name: [] for name in POOLINGS}
    labels = []
    backbone.eval()
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="features", leave=False):
            fmap = backbone.forward_features(images)
            if fmap.ndim != 4:
                raise ValueError(f"forward_features returned shape {tuple(fmap.shape)}, not (B, C, H, W)")
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
    args, overrides = parser.parse_known_args()

    cli = train(["--config", args.config, "--trainer.logger=false", *overrides], run=False)
    backbone = cli.model.teacher.backbone if args.random_init else load_backbone(args.ckpt)
    cli.datamodule.setup("fit")
    bank, bank_labels = pooled_features(backbone, cli.datamodule.knn_train_dataloader())
    queries, query_labels = pooled_features(backbone, cli.datamodule.knn_val_dataloader())
    which = "random init" if args.random_init else args.ckpt
    for name in POOLINGS:
        top1, _ = knn_accuracy(bank[name], bank_labels, queries[name], query_labels)
        print(f"{which} | {name:7s} pooling | dim {bank[name].shape[1]:5d} | k-NN top1 {100 * top1:.2f}%")


if __name__ == "__main__":
    main()
