"""Run KNNMonitor under 2-process CPU DDP (gloo); each rank writes its result to argv[1].

Launched by test_eval_ddp.py as a plain script, because Lightning's DDP launcher re-executes
the command line for rank 1.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino.eval import KNNMonitor, extract_features, knn_accuracy


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))


class TinyDINO(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.student, self.teacher = Branch(), Branch().requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.student.backbone(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.0)


class RandomData(pl.LightningDataModule):
    """Odd split sizes so DistributedSampler pads; random labels so duplicates would show."""

    has_labels, num_classes = True, 5

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.train = TensorDataset(torch.randn(37, 3, 4, 4, generator=gen), torch.arange(37) % 5)
        self.val = TensorDataset(torch.randn(13, 3, 4, 4, generator=gen), torch.arange(13) % 5)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4)

    def knn_train_dataloader(self):
        return DataLoader(self.train, batch_size=4)

    def knn_val_dataloader(self):
        return DataLoader(self.val, batch_size=4)


def main():
    module, data, monitor = TinyDINO(), RandomData(), KNNMonitor(k=3, max_train_samples=29)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=data)
    subset = monitor._train_subset(len(data.train))
    train = extract_features(module.teacher.backbone, data.knn_train_dataloader(), progress=False)
    val = extract_features(module.teacher.backbone, data.knn_val_dataloader(), progress=False)
    expected = knn_accuracy(train[0][subset], train[1][subset], *val, k=3)
    result = {"got": [monitor.last_top1, monitor.last_top5], "expected": list(expected)}
    Path(sys.argv[1], f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
