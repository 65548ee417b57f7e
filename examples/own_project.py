"""A Lightning project of your own that uses lightning_dino: your data module, your Trainer.

It walks the whole path on a folder of images in class subfolders (``root/<class>/*.jpg``):

1. self-supervised DINO pre-training, with this file's own ``LightningDataModule`` (dict batches,
   crops made by :class:`lightning_dino.MultiCropTransform`) and a Trainer with the usual
   callbacks: ``DINOCheckpoint`` (a ``ModelCheckpoint`` that also saves on SIGTERM) and
   ``EarlyStopping`` on the epoch-mean loss, ``LearningRateMonitor`` (DINO's lr and
   weight-decay schedules are a Lightning scheduler), ``CSVLogger``, and k-NN during training
   from this project's own labelled loaders;
2. export of the teacher backbone (plain timm weights + ``config.json``);
3. supervised fine-tuning of a trainable copy of the teacher backbone with a linear head.

Usage::

    python examples/own_project.py --images /data/my_images --out runs/own --epochs 20
    python examples/own_project.py --images DIR --out OUT --tiny   # a 1-minute smoke run on a CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from lightning_dino import (
    DINO,
    DINOCheckpoint,
    KNNMonitor,
    MultiCropTransform,
    export_backbone,
    load_backbone,
)
from lightning_dino.data import ImageFolderDataset


class Views(Dataset):
    """``{"crops": [...], "label": y}`` samples: an image folder through a transform."""

    def __init__(self, images: Dataset, transform: nn.Module | MultiCropTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, object]:
        image, label = self.images[index]
        return {"crops": self.transform(image), "label": label}


class FolderData(pl.LightningDataModule):
    """This project's data module: multi-crop training batches, plain labelled eval batches."""

    def __init__(self, root: str, crop: int, local_crop: int, batch_size: int) -> None:
        super().__init__()
        self.root, self.crop, self.batch_size = root, crop, batch_size
        self.multi_crop = MultiCropTransform(
            global_crop_size=crop, local_crop_size=local_crop, n_local_crops=4
        )
        self.eval_transform = v2.Compose(
            [
                v2.Resize(crop, antialias=True),
                v2.CenterCrop(crop),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        """Read the folder once; every 4th image is held out for k-NN and fine-tuning checks."""
        images = ImageFolderDataset(self.root)
        held_out = set(range(0, len(images), 4))
        self.train_images = Subset(images, [i for i in range(len(images)) if i not in held_out])
        self.val_images = Subset(images, sorted(held_out))

    def train_dataloader(self) -> DataLoader:
        """Shuffled dict batches ``{"crops": [g1, g2, l1..l4], "label": (B,)}``."""
        return DataLoader(
            Views(self.train_images, self.multi_crop),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
        )

    def labelled(self, split: str, shuffle: bool = False) -> DataLoader:
        """``(images, labels)`` batches of ``split`` (``"train"`` or ``"val"``), no augmentation."""
        subset = self.train_images if split == "train" else self.val_images
        pairs = Views(subset, self.eval_transform)
        return DataLoader(
            pairs, batch_size=self.batch_size, shuffle=shuffle, collate_fn=_image_label_batch
        )


def _image_label_batch(samples: list[dict[str, object]]) -> tuple[Tensor, Tensor]:
    images = torch.stack([s["crops"] for s in samples])  # type: ignore[misc]
    return images, torch.tensor([int(s["label"]) for s in samples])  # type: ignore[arg-type]


class FineTune(pl.LightningModule):
    """A trainable backbone and a linear head, trained with cross-entropy."""

    def __init__(self, backbone: nn.Module, num_classes: int, lr: float) -> None:
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
        self.log("finetune/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Top-1 accuracy of one held-out batch."""
        images, labels = batch
        accuracy = (self(images).argmax(1) == labels).float().mean()
        self.log("finetune/val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every parameter: the backbone copy is trainable."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Pre-train, export and fine-tune; returns what each stage produced."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder with one subfolder per class")
    parser.add_argument("--out", default="runs/own_project")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny ViT and 32-px crops")
    args = parser.parse_args(argv)
    out = Path(args.out)
    pl.seed_everything(0)

    tiny = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    crop, local_crop = (32, 16) if args.tiny else (224, 96)
    data = FolderData(args.images, crop, local_crop, batch_size=8 if args.tiny else 64)
    data.setup()
    model = DINO(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=tiny if args.tiny else None,
        out_dim=256 if args.tiny else 65536,
        warmup_epochs=1 if args.tiny else 10,
        freeze_last_layer=0 if args.tiny else 1,
    )
    knn = KNNMonitor(train_dataloader=data.labelled("train"), val_dataloader=data.labelled("val"))
    checkpoints = DINOCheckpoint(
        dirpath=out / "checkpoints", monitor="train/loss_epoch", save_last=True, save_top_k=1
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        logger=CSVLogger(out, name="pretrain"),
        log_every_n_steps=1,
        callbacks=[
            checkpoints,
            EarlyStopping(monitor="train/loss_epoch", patience=5, check_on_train_epoch_end=True),
            LearningRateMonitor(logging_interval="step", log_weight_decay=True),
            knn,
        ],
    )
    trainer.fit(model, datamodule=data)

    export_dir = export_backbone(checkpoints.last_model_path, out / "export")
    backbone = load_backbone(export_dir)  # train mode, trainable: ready to fine-tune
    num_classes = len(ImageFolderDataset(args.images).classes)
    finetune = FineTune(backbone, num_classes, lr=1e-3 if args.tiny else 1e-4)
    tuner = pl.Trainer(
        max_epochs=2 if args.tiny else 10,
        accelerator="auto",
        logger=CSVLogger(out, name="finetune"),
        enable_checkpointing=False,
    )
    tuner.fit(finetune, data.labelled("train", shuffle=True), data.labelled("val"))
    print(f"k-NN top-1 of the teacher: {knn.last_top1:.3f}; export: {export_dir}")
    return {
        "steps": trainer.global_step,
        "knn_top1": knn.last_top1,
        "export": export_dir,
        "val_acc": float(tuner.callback_metrics["finetune/val_acc"]),
        "model": model,
        "finetune": finetune,
    }


if __name__ == "__main__":
    main()
