"""Fine-tune an exported DINO backbone on labelled images, with plain timm and Lightning.

The export directory (``lightning-dino export --ckpt RUN.ckpt --out DIR``) holds
``model.safetensors`` and ``config.json``; loading it needs only timm. A linear head goes on
top of the backbone and the whole network is fine-tuned with cross-entropy (the backbone at a
10x lower learning rate than the head). Nothing here imports ``lightning_dino``.

Usage::

    # Fashion-MNIST (idx .gz files), ~1 minute on a CPU with a small --limit
    python examples/finetune_exported_backbone.py --export exports/fmnist --data fashion_mnist \
        --epochs 1 --limit 512

    # Any folder of class sub-folders (torchvision ImageFolder layout); 20 % held out
    python examples/finetune_exported_backbone.py --export DIR --data folder --data-dir IMAGES
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, random_split
from torchvision import datasets
from torchvision.transforms import v2

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_exported_backbone(export_dir: Path) -> tuple[nn.Module, dict]:
    """Build the timm model named in ``config.json`` and load ``model.safetensors`` strictly.

    ``num_classes=0`` in the overlay keeps timm's loading strict; ``custom_load=False`` makes
    timm read the file as a plain state dict.

    Args:
        export_dir: The export directory.

    Returns:
        ``(backbone, config)``: a model mapping (B, 3, H, W) to (B, num_features), and the
        parsed ``config.json``.
    """
    config = json.loads((export_dir / "config.json").read_text())
    backbone = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={
            "file": str(export_dir / "model.safetensors"),
            "num_classes": 0,
            "custom_load": False,
        },
        num_classes=0,
        **config["model_args"],
    )
    return backbone, config


class Classifier(pl.LightningModule):
    """A backbone (named ``backbone``, as ``BackboneFinetuning`` expects) plus a linear head.

    Args:
        backbone: Feature extractor returning (B, D), with ``num_features == D``.
        num_classes: Number of labels.
        lr: Learning rate of the head; the backbone uses ``lr / 10``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.lr = lr

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, 3, H, W)."""
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one labelled batch."""
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Top-1 accuracy and loss on one held-out batch."""
        images, labels = batch
        logits = self(images)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels))
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW, with the pre-trained backbone at a tenth of the head's learning rate."""
        return torch.optim.AdamW(
            [
                {"params": self.backbone.parameters(), "lr": self.lr / 10},
                {"params": self.head.parameters(), "lr": self.lr},
            ],
            weight_decay=0.05,
        )


class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx ``.gz`` files: (3, size, size) normalised images and labels.

    Args:
        root: Folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        split: ``"train"`` (60,000 images) or ``"t10k"`` (10,000).
        transform: Maps a uint8 (1, 28, 28) tensor to the model's input.
    """

    def __init__(self, root: str, split: str, transform: v2.Transform) -> None:
        images = _read_idx(Path(root) / f"{split}-images-idx3-ubyte.gz", offset=16)
        self.images = torch.from_numpy(images.reshape(-1, 1, 28, 28))
        labels = _read_idx(Path(root) / f"{split}-labels-idx1-ubyte.gz", offset=8)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    """The uint8 payload of an idx file after its ``offset``-byte header."""
    with gzip.open(path, "rb") as file:
        return np.frombuffer(file.read(), dtype=np.uint8, offset=offset).copy()


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """DINO's evaluation preprocessing: resize, center crop, RGB, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            v2.RGB(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def build_datasets(args: argparse.Namespace, transform: v2.Compose) -> tuple[Dataset, Dataset, int]:
    """Train and validation sets (each cut to ``--limit`` images) and the number of classes."""
    if args.data == "fashion_mnist":
        root = args.data_dir or FASHION_MNIST_DIR
        train, val = FashionMNIST(root, "train", transform), FashionMNIST(root, "t10k", transform)
        num_classes = 10
    else:
        folder = datasets.ImageFolder(args.data_dir, transform=transform)
        train, val = random_split(folder, [0.8, 0.2], torch.Generator().manual_seed(0))
        num_classes = len(folder.classes)
    if args.limit:
        gen = torch.Generator().manual_seed(0)
        train = Subset(train, torch.randperm(len(train), generator=gen)[: args.limit].tolist())
        val = Subset(val, torch.randperm(len(val), generator=gen)[: args.limit].tolist())
    return train, val, num_classes


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse arguments, fine-tune, and return the final validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="export directory")
    parser.add_argument("--data", choices=["fashion_mnist", "folder"], default="fashion_mnist")
    parser.add_argument("--data-dir", help=f"image folder (fashion_mnist: {FASHION_MNIST_DIR})")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, help="use at most this many train and val images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="head lr (backbone: lr / 10)")
    parser.add_argument("--image-size", type=int, help="default: the export's input size")
    parser.add_argument("--out", default="runs/finetune", help="logs and checkpoints")
    args = parser.parse_args(argv)
    if args.data == "folder" and not args.data_dir:
        parser.error("--data folder needs --data-dir")

    backbone, config = load_exported_backbone(args.export)
    data_cfg = config.get("pretrained_cfg", {})
    size = args.image_size or data_cfg.get("input_size", [3, 224, 224])[-1]
    mean, std = data_cfg.get("mean", IMAGENET_MEAN), data_cfg.get("std", IMAGENET_STD)
    transform = eval_transform(size, mean, std)
    train, val, num_classes = build_datasets(args, transform)

    model = Classifier(backbone, num_classes, lr=args.lr)
    trainer = pl.Trainer(max_epochs=args.epochs, default_root_dir=args.out, devices=1)
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=args.batch_size),
    )
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    print(f"val/acc after {args.epochs} epoch(s): {metrics.get('val/acc', float('nan')):.4f}")
    return metrics


if __name__ == "__main__":
    main()
