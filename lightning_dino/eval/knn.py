"""Weighted k-nearest-neighbour evaluation of frozen features, offline and during training.

Reference: Caron et al. 2021, §3.2 and App. F.1 (after Wu et al. 2018); facebookresearch/dino
``eval_knn.py``. Features are L2-normalised, similarity is the cosine, and each of the ``k``
nearest training samples votes for its label with weight ``exp(sim / T)`` (k=20, T=0.07). Unlike
the reference, any number of classes works and the test set is chunked by a fixed row count, so a
test set smaller than a chunk (the reference breaks under 100 images) is fine.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Score every class for a batch of queries by weighted voting of the k nearest neighbours.

    Both feature sets are L2-normalised here. Memory is O(n_test * n_train), so call this on chunks
    of queries (as :func:`knn_accuracy` does) for large test sets.

    Args:
        train_features: Training features, shape (n_train, D).
        train_labels: Integer training labels, shape (n_train,).
        test_features: Query features, shape (n_test, D).
        k: Number of neighbours; clamped to n_train.
        temperature: Vote weight temperature T: a neighbour with cosine ``s`` adds ``exp(s / T)``.
        num_classes: Number of classes C; inferred as ``train_labels.max() + 1`` when None.

    Returns:
        Class scores, shape (n_test, C), float32. A class that got no vote scores exactly 0; every
        vote is positive.

    Examples:
        >>> train = torch.randn(100, 8)
        >>> scores = knn_predict(train, torch.arange(100) % 4, train[:3], k=5)
        >>> scores.argmax(dim=1)
        tensor([0, 1, 2])
    """
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    similarity = test @ train.T
    top_sim, top_idx = similarity.topk(min(k, train.shape[0]), dim=1)
    votes = (top_sim / temperature).exp()
    neighbour_labels = train_labels.to(train.device)[top_idx]
    scores = torch.zeros(test.shape[0], num_classes, device=train.device)
    return scores.scatter_add_(1, neighbour_labels, votes)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of the weighted k-NN classifier (DINO's k-NN protocol).

    The test set is processed ``chunk_size`` rows at a time, so peak memory is about
    ``chunk_size * n_train`` floats whatever the test set size. A query counts as a top-n hit when
    its label is among the n highest class scores (``torch.topk``) *and* received at least one
    vote, so classes tied at zero are never lucky guesses. With fewer than 5 classes, top-5 is
    top-C.

    Args:
        train_features: Training features, shape (n_train, D).
        train_labels: Integer training labels, shape (n_train,).
        test_features: Test features, shape (n_test, D).
        test_labels: Integer test labels, shape (n_test,).
        k: Number of neighbours (20 in the paper); clamped to n_train.
        temperature: Vote weight temperature (0.07 in the paper).
        num_classes: Number of classes; inferred from both label tensors when None.
        chunk_size: Test rows scored at once.

    Returns:
        ``(top1, top5)`` as fractions in [0, 1].

    Examples:
        >>> feats = torch.eye(4).repeat(5, 1) + 0.01 * torch.randn(20, 4)
        >>> labels = torch.arange(4).repeat(5)
        >>> knn_accuracy(feats, labels, feats, labels, k=3)
        (1.0, 1.0)
    """
    if test_features.shape[0] == 0:
        raise ValueError("knn_accuracy needs at least one test sample, got an empty test set")
    if num_classes is None:
        num_classes = int(torch.cat([train_labels, test_labels]).max()) + 1
    device = train_features.device
    top_n = min(5, num_classes)
    hits_top1 = hits_top5 = 0
    for start in range(0, test_features.shape[0], chunk_size):
        queries = test_features[start : start + chunk_size]
        labels = test_labels[start : start + chunk_size].to(device)
        scores = knn_predict(train_features, train_labels, queries, k, temperature, num_classes)
        best_scores, best_classes = scores.topk(top_n, dim=1)
        hits = (best_classes == labels[:, None]) & (best_scores > 0)
        hits_top1 += int(hits[:, 0].sum())
        hits_top5 += int(hits.any(dim=1).sum())
    return hits_top1 / len(test_labels), hits_top5 / len(test_labels)


def extract_features(
    backbone: nn.Module,
    dataloader: DataLoader,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embed a labelled dataset with a frozen backbone.

    The backbone runs in eval mode under ``torch.inference_mode`` and gets its previous
    train/eval mode back afterwards (including on error).

    Args:
        backbone: Module mapping images (B, 3, H, W) to features (B, D), e.g. a timm model
            created with ``num_classes=0``.
        dataloader: Yields ``(images, labels)`` with images (B, 3, H, W) and labels (B,).
        device: Where to run; defaults to the device of the backbone's first parameter (CPU for a
            parameter-free module).
        progress: Show a tqdm progress bar.

    Returns:
        ``(features, labels)``: float32 features of shape (N, D) and labels of shape (N,), on
        ``device``, in the dataloader's order.
    """
    if device is None:
        device = next(backbone.parameters(), torch.empty(0)).device
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        with torch.inference_mode():
            for images, targets in tqdm(
                dataloader, desc="features", disable=not progress, leave=False
            ):
                features.append(backbone(images.to(device, non_blocking=True)).float())
                labels.append(targets.to(device, non_blocking=True))
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def evaluated_backbone(pl_module: pl.LightningModule) -> nn.Module:
    """The backbone a monitor evaluates: the network the module trains for its users.

    ``pl_module.evaluated_backbone`` when the module defines it (``DINO``: the EMA teacher;
    ``Distillation``: the student's EMA, never the frozen teacher it learns from), otherwise
    ``pl_module.teacher.backbone`` (a user's own module shaped like ``DINO``).

    Raises:
        AttributeError: The module has neither, naming both.
    """
    backbone = getattr(pl_module, "evaluated_backbone", None)
    if backbone is not None:
        return backbone
    teacher = getattr(pl_module, "teacher", None)
    if teacher is None or not isinstance(getattr(teacher, "backbone", None), nn.Module):
        raise AttributeError(
            f"{type(pl_module).__name__} has neither an evaluated_backbone nor a "
            "teacher.backbone to evaluate; give it an evaluated_backbone property"
        )
    return teacher.backbone


class KNNMonitor(Callback):
    """Log the weighted k-NN accuracy of the evaluated backbone during training.

    At the end of every ``every_n_epochs``-th training epoch, and at the end of training if the
    last epoch was not evaluated already, the callback embeds the data module's
    ``knn_train_dataloader()`` and ``knn_val_dataloader()`` (both yielding ``(images, labels)``)
    with :func:`evaluated_backbone` (DINO's teacher, a distillation's student EMA) and logs
    ``knn/top1`` and ``knn/top5``. The end-of-training
    value goes straight to the loggers, since Lightning forbids ``self.log`` in ``on_train_end``.

    Under DDP every rank embeds a shard (``DistributedSampler(shuffle=False)``), the features,
    labels and sample indices are all-gathered, the sampler's padding duplicates are dropped, and
    every rank computes the same accuracy. It is logged with ``sync_dist=False`` from every rank so
    that ``ModelCheckpoint(monitor="knn/top1")`` works on all of them.

    Where the labelled images come from, first match wins:

    1. ``train_dataloader`` / ``val_dataloader`` given here (any loaders of ``(images, labels)``
       batches, e.g. your own data module's evaluation loaders);
    2. the trainer's data module, if it has ``knn_train_dataloader()`` and
       ``knn_val_dataloader()`` (and ``has_labels`` is not False); ``num_classes`` is read when
       present. :class:`~lightning_dino.data.MultiCropDataModule` provides these.

    With neither, the callback warns once, saying how to give it data, and does nothing.

    Args:
        every_n_epochs: Evaluate after every n-th training epoch.
        k: Number of neighbours.
        temperature: Vote weight temperature.
        max_train_samples: Use a fixed random subset (seed 0) of at most this many training
            samples as the neighbour bank; all of them when None.
        train_dataloader: Labelled neighbour bank: batches ``(images (B, 3, H, W), labels (B,))``.
        val_dataloader: Labelled queries, same format.
        num_classes: Number of classes (default: the largest label + 1).

    Attributes:
        last_top1: Latest top-1 accuracy in [0, 1], None before the first evaluation.
        last_top5: Latest top-5 accuracy in [0, 1], None before the first evaluation.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[KNNMonitor(every_n_epochs=10)])  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        max_train_samples: int | None = None,
        train_dataloader: DataLoader | None = None,
        val_dataloader: DataLoader | None = None,
        num_classes: int | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"KNNMonitor: every_n_epochs must be >= 1, got {every_n_epochs}")
        if (train_dataloader is None) != (val_dataloader is None):
            raise ValueError("KNNMonitor: give both train_dataloader and val_dataloader or none")
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.num_classes = num_classes
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.max_train_samples = max_train_samples
        self.last_top1: float | None = None
        self.last_top5: float | None = None
        self._evaluated_at_step: int | None = None
        self._disabled = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate on every n-th epoch and on the last one; log with ``pl_module.log``."""
        if (trainer.current_epoch + 1) % self.every_n_epochs and not _is_last_epoch(trainer):
            return
        if self._evaluate(trainer, pl_module):
            pl_module.log("knn/top1", self.last_top1, sync_dist=False, rank_zero_only=False)
            pl_module.log("knn/top5", self.last_top5, sync_dist=False, rank_zero_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the final weights unless the last epoch end already did."""
        if self._evaluated_at_step == trainer.global_step:
            return
        if self._evaluate(trainer, pl_module) and trainer.is_global_zero:
            for logger in trainer.loggers:
                metrics = {"knn/top1": self.last_top1, "knn/top5": self.last_top5}
                logger.log_metrics(metrics, step=trainer.global_step)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Compute and store the accuracies; return False when there is nothing to evaluate."""
        loaders = self._loaders(trainer)
        if loaders is None:
            return False
        train_loader, val_loader, num_classes = loaders
        backbone = evaluated_backbone(pl_module)
        subset = self._train_subset(len(train_loader.dataset))
        with trainer.precision_plugin.forward_context():
            train = _embed_all(trainer, pl_module, backbone, train_loader, subset)
            test = _embed_all(trainer, pl_module, backbone, val_loader, None)
        self.last_top1, self.last_top5 = knn_accuracy(
            *train, *test, k=self.k, temperature=self.temperature, num_classes=num_classes
        )
        self._evaluated_at_step = trainer.global_step
        return True

    def _loaders(self, trainer: pl.Trainer) -> tuple[DataLoader, DataLoader, int | None] | None:
        """The labelled bank and query loaders and the class count, or None (warned once)."""
        if self.train_dataloader is not None and self.val_dataloader is not None:
            return self.train_dataloader, self.val_dataloader, self.num_classes
        datamodule = getattr(trainer, "datamodule", None)
        has_protocol = all(
            callable(getattr(datamodule, name, None))
            for name in ("knn_train_dataloader", "knn_val_dataloader")
        )
        if has_protocol and getattr(datamodule, "has_labels", True):
            num_classes = self.num_classes or getattr(datamodule, "num_classes", None)
            return datamodule.knn_train_dataloader(), datamodule.knn_val_dataloader(), num_classes
        if not self._disabled:
            reason = "has no labels" if has_protocol else "has no knn_train/val_dataloader()"
            rank_zero_warn(
                f"KNNMonitor: the data module {reason}, so k-NN evaluation is off. Give the "
                "callback labelled loaders: KNNMonitor(train_dataloader=..., "
                "val_dataloader=...), batches (images, labels)."
            )
        self._disabled = True
        return None

    def _train_subset(self, size: int) -> list[int] | None:
        """Sorted indices of a fixed random subset of a bank of ``size``, or None for all of it."""
        if self.max_train_samples is None or self.max_train_samples >= size:
            return None
        chosen = torch.randperm(size, generator=torch.Generator().manual_seed(0))
        return chosen[: self.max_train_samples].sort().values.tolist()


def _is_last_epoch(trainer: pl.Trainer) -> bool:
    """Whether training stops after the current epoch (max_epochs, max_steps or a stop request)."""
    max_epochs_done = (
        trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
    )
    max_steps_done = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    return trainer.should_stop or max_epochs_done or max_steps_done


def _show_progress(trainer: pl.Trainer) -> bool:
    """Show feature-extraction progress on rank zero when the trainer shows a progress bar."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


def _embed_all(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    backbone: nn.Module,
    loader: DataLoader,
    subset: list[int] | None,
) -> tuple[Tensor, Tensor]:
    """Embed a dataset (or a subset of it), sharded over ranks and gathered onto every rank.

    Args:
        trainer: The running trainer (gives world size and rank).
        pl_module: The module, used for ``all_gather`` and its device.
        backbone: Feature extractor, images (B, 3, H, W) -> (B, D).
        loader: Loader over ``(images, labels)``; its dataset is re-sharded when needed.
        subset: Dataset indices to keep, or None for the whole dataset.

    Returns:
        ``(features (N, D), labels (N,))`` for the whole (sub)set in dataset order, on every rank.
    """
    dataset = loader.dataset if subset is None else Subset(loader.dataset, subset)
    if trainer.world_size == 1 and subset is None:
        return extract_features(backbone, loader, pl_module.device, _show_progress(trainer))
    sampler = DistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    sharded = DataLoader(
        dataset,
        batch_size=loader.batch_size or 1,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )
    features, labels = extract_features(
        backbone, sharded, pl_module.device, _show_progress(trainer)
    )
    if trainer.world_size == 1:
        return features, labels
    indices = torch.tensor(list(sampler), device=pl_module.device)
    gathered = [pl_module.all_gather(t).flatten(0, 1) for t in (features, labels, indices)]
    return _drop_padding(*gathered)


def _drop_padding(features: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort gathered samples by dataset index and keep the first copy of each.

    Args:
        features: Gathered features, shape (world_size * n_per_rank, D).
        labels: Gathered labels, shape (world_size * n_per_rank,).
        indices: Dataset index of each gathered row, shape (world_size * n_per_rank,).

    Returns:
        ``(features (N, D), labels (N,))`` with one row per dataset sample, in dataset order.
    """
    sorted_indices, order = indices.sort(stable=True)
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    order = order[first]
    return features[order], labels[order]
