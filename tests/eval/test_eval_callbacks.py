import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino.eval import AttentionMapMonitor, KNNMonitor, knn_accuracy


class Branch(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Identity()


class TinyDINO(pl.LightningModule):
    """Stand-in for the DINO module: `.student/.teacher.backbone`, a two-crop batch format."""

    def __init__(self, make_backbone):
        super().__init__()
        torch.manual_seed(0)
        self.student = Branch(make_backbone())
        self.teacher = Branch(make_backbone())

    def training_step(self, batch, batch_idx):
        crops, _ = batch
        return self.student.backbone(crops[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.0)


def projection():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))


def tiny_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=8,
        patch_size=4,
        depth=1,
        embed_dim=24,
        num_heads=2,
    )


class ClusterData(pl.LightningDataModule):
    """Well-separated classes; train batches are `([global1, global2], labels)`."""

    def __init__(self, has_labels=True, num_classes=3, n_train=30, n_val=12):
        super().__init__()
        self.has_labels = has_labels
        self.num_classes = num_classes if has_labels else None
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn(num_classes, 3, 8, 8, generator=gen) * 5

        def split(n):
            labels = torch.arange(n) % num_classes
            return centres[labels] + 0.1 * torch.randn(n, 3, 8, 8, generator=gen), labels

        self.knn_train, self.knn_val = TensorDataset(*split(n_train)), TensorDataset(*split(n_val))

    def train_dataloader(self):
        images, labels = self.knn_train.tensors
        pairs = [
            ((image, image.flip(-1)), label) for image, label in zip(images, labels, strict=True)
        ]
        return DataLoader(pairs, batch_size=8)

    def knn_train_dataloader(self):
        return DataLoader(self.knn_train, batch_size=8)

    def knn_val_dataloader(self):
        return DataLoader(self.knn_val, batch_size=8)


def make_trainer(callbacks, max_epochs=1, logger=False):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def test_knn_monitor_logs_perfect_accuracy_on_separated_data():
    monitor = KNNMonitor(k=5)
    trainer = make_trainer([monitor])
    trainer.fit(TinyDINO(projection), datamodule=ClusterData())
    assert trainer.callback_metrics["knn/top1"].item() == 1.0
    assert trainer.callback_metrics["knn/top5"].item() == 1.0
    assert monitor.last_top1 == 1.0


def test_knn_monitor_schedule_and_subset(monkeypatch):
    monitor = KNNMonitor(every_n_epochs=2, k=3, max_train_samples=9)
    calls = []
    evaluate = monitor._evaluate
    monkeypatch.setattr(
        monitor, "_evaluate", lambda t, m: calls.append(t.current_epoch) or evaluate(t, m)
    )
    make_trainer([monitor], max_epochs=3).fit(TinyDINO(projection), datamodule=ClusterData())
    assert calls == [1, 2]  # every 2nd epoch, then the last one; not again in on_train_end
    assert monitor._train_subset(30) == monitor._train_subset(30)
    assert len(monitor._train_subset(30)) == 9 and monitor._train_subset(5) is None


def test_knn_monitor_matches_offline_accuracy_on_noisy_labels():
    data = ClusterData(num_classes=4)
    data.knn_val.tensors[1][::3] = 0  # relabel some queries: accuracy strictly between 0 and 1
    module = TinyDINO(projection)
    monitor = KNNMonitor(k=5, temperature=0.1)
    make_trainer([monitor]).fit(module, datamodule=data)
    with torch.no_grad():
        train = (module.teacher.backbone(data.knn_train.tensors[0]), data.knn_train.tensors[1])
        val = (module.teacher.backbone(data.knn_val.tensors[0]), data.knn_val.tensors[1])
    expected = knn_accuracy(*train, *val, k=5, temperature=0.1)
    assert 0 < expected[0] < 1
    assert (monitor.last_top1, monitor.last_top5) == pytest.approx(expected)


class RecordingLogger(Logger):
    name, version = "recording", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((metrics, step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_knn_monitor_evaluates_at_train_end_when_last_epoch_was_skipped():
    # EarlyStopping-like case: training ends after an epoch the schedule did not evaluate.
    monitor = KNNMonitor(every_n_epochs=5, k=3)
    logger = RecordingLogger()
    trainer = make_trainer([monitor], logger=logger)
    module = TinyDINO(projection)
    trainer.fit(module, datamodule=ClusterData())
    assert monitor.last_top1 == 1.0
    monitor._evaluated_at_step, monitor.last_top1, logger.metrics = None, None, []
    monitor.on_train_end(trainer, module)
    assert logger.metrics == [({"knn/top1": 1.0, "knn/top5": 1.0}, trainer.global_step)]
    monitor.on_train_end(trainer, module)  # already evaluated at this step: nothing new
    assert len(logger.metrics) == 1


def test_knn_monitor_without_labels_does_nothing():
    monitor = KNNMonitor()
    trainer = make_trainer([monitor], max_epochs=2)
    trainer.fit(TinyDINO(projection), datamodule=ClusterData(has_labels=False))
    assert "knn/top1" not in trainer.callback_metrics
    assert monitor.last_top1 is None


@pytest.mark.parametrize("has_labels", [True, False])
def test_attention_monitor_logs_to_tensorboard(tmp_path, has_labels):
    monitor = AttentionMapMonitor(n_images=3, threshold=0.6)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = make_trainer([monitor], max_epochs=1, logger=logger)
    data = ClusterData(has_labels=has_labels)
    trainer.fit(TinyDINO(tiny_vit), datamodule=data)
    expected_images = data.knn_val.tensors[0][:3] if has_labels else data.knn_train.tensors[0][:3]
    torch.testing.assert_close(monitor._images, expected_images)
    assert monitor.last_grid.shape == (3, 3 * (8 + 2) + 2, 4 * (8 + 2) + 2)  # image, mean, 2 heads
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_attention_monitor_disables_itself_for_resnet():
    monitor = AttentionMapMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_epochs=2).fit(TinyDINO(projection), datamodule=ClusterData())
    messages = [str(w.message) for w in caught if "AttentionMapMonitor" in str(w.message)]
    assert len(messages) == 1 and "not a ViT" in messages[0]
    assert monitor.last_grid is None


class DictBatchData(ClusterData):
    def train_dataloader(self):
        images, labels = self.knn_train.tensors
        return DataLoader([{"image": x, "label": y} for x, y in zip(images, labels, strict=True)])


class DictBatchDINO(TinyDINO):
    def training_step(self, batch, batch_idx):
        return self.student.backbone(batch["image"]).pow(2).mean()


def test_attention_monitor_disables_itself_without_images():
    monitor = AttentionMapMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor]).fit(DictBatchDINO(tiny_vit), datamodule=DictBatchData(False))
    messages = [str(w.message) for w in caught if "AttentionMapMonitor" in str(w.message)]
    assert len(messages) == 1 and "no (B, 3, H, W) image tensor" in messages[0]
    assert monitor.last_grid is None
