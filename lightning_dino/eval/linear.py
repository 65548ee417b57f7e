"""Linear probe on frozen features (Caron et al. 2021, App. F.2; dino ``eval_linear.py``).

A linear classifier, initialised N(0, 0.01) with zero bias, is trained by SGD (momentum 0.9, no
weight decay, lr 0.001 x global_batch / 256, cosine-annealed to 0 over the run) on the features of
a frozen backbone, recomputed each step so augmentation applies. For a ViT the features are the
CLS tokens of the last 4 blocks, each through the final LayerNorm, concatenated (1536-d for
ViT-S); for other backbones, the pooled output. The reference reports the best validation top-1
over epochs; both the best and the last are tracked here.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

FeatureMode = Literal["auto", "cls", "last4_cls", "pooled"]


def resolve_feature_mode(backbone: nn.Module, feature_mode: FeatureMode) -> FeatureMode:
    """Pick the concrete feature mode: ``auto`` is ``last4_cls`` for a ViT with a CLS token.

    Args:
        backbone: The frozen backbone.
        feature_mode: Requested mode.

    Returns:
        ``"cls"``, ``"last4_cls"`` or ``"pooled"``.

    Raises:
        ValueError: A CLS mode was requested for a backbone without a class token.
    """
    has_cls = isinstance(backbone, VisionTransformer) and backbone.cls_token is not None
    if feature_mode == "auto":
        return "last4_cls" if has_cls else "pooled"
    if feature_mode in ("cls", "last4_cls") and not has_cls:
        raise ValueError(
            f"feature_mode={feature_mode!r} needs a timm VisionTransformer with a class token, got "
            f"{type(backbone).__name__}; use feature_mode='pooled' or 'auto'"
        )
    if feature_mode not in ("cls", "last4_cls", "pooled"):
        raise ValueError(
            f"feature_mode must be auto, cls, last4_cls or pooled, got {feature_mode!r}"
        )
    return feature_mode


def probe_features(backbone: nn.Module, images: Tensor, feature_mode: FeatureMode) -> Tensor:
    """Compute linear-probe features of a batch (no grad handling; the caller decides).

    Args:
        backbone: The backbone; a timm ``VisionTransformer`` for the CLS modes.
        images: Images, shape (B, 3, H, W).
        feature_mode: ``cls`` (last block's CLS after the final norm), ``last4_cls`` (the CLS of
            each of the last min(4, depth) blocks after the final norm, concatenated), or
            ``pooled`` (``backbone(images)``); ``auto`` is resolved first.

    Returns:
        Features, shape (B, D) with D = ``probe_feature_dim(backbone, feature_mode)``.
    """
    mode = resolve_feature_mode(backbone, feature_mode)
    if mode == "pooled":
        return backbone(images)
    layers = backbone.forward_intermediates(
        images,
        indices=_num_cls_blocks(backbone, mode),
        norm=True,  # timm applies the final `norm` to every intermediate, as DINO's code does
        return_prefix_tokens=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    return torch.cat([prefix[:, 0] for _, prefix in layers], dim=-1)


def probe_feature_dim(backbone: nn.Module, feature_mode: FeatureMode) -> int | None:
    """Feature size D of :func:`probe_features`, or None if it cannot be read from the model.

    Args:
        backbone: The backbone.
        feature_mode: Requested mode.

    Returns:
        ``embed_dim x blocks`` for the CLS modes, ``backbone.num_features`` (timm models) for
        ``pooled``, or None for a module without ``num_features``.
    """
    mode = resolve_feature_mode(backbone, feature_mode)
    if mode == "pooled":
        return getattr(backbone, "num_features", None)
    return backbone.embed_dim * _num_cls_blocks(backbone, mode)


def _num_cls_blocks(vit: VisionTransformer, mode: FeatureMode) -> int:
    """Number of last blocks whose CLS tokens are used: 1 or min(4, depth)."""
    return min(4, len(vit.blocks)) if mode == "last4_cls" else 1


class LinearProbe(pl.LightningModule):
    """Train a linear classifier on a frozen backbone's features (DINO's linear evaluation).

    The backbone is frozen in place (``requires_grad_(False)``, kept in eval mode even when the
    probe is put in train mode), left out of the optimizer, and left out of saved checkpoints
    (loading one puts the backbone given to the new probe back in). Lightning's "modules in eval
    mode at the start of training" warning is therefore expected.

    The lr is ``lr x global_batch / 256``, the global batch being the train loader's
    ``batch_size`` x world size x gradient accumulation, annealed by ``CosineAnnealingLR`` over
    ``trainer.max_epochs``.

    Logs ``probe/train_loss`` (epoch mean) and ``probe/val_top1`` (per validation epoch).

    Args:
        backbone: Frozen feature extractor, e.g. ``dino.teacher.backbone``.
        num_classes: Number of classes (>= 2).
        feature_mode: ``auto`` (``last4_cls`` for a ViT with a class token, else ``pooled``),
            ``cls``, ``last4_cls`` or ``pooled``; see :func:`probe_features`.
        lr: Base learning rate for a global batch of 256 (0.001 in the reference; sweep it).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (0 in the reference).
        feature_dim: Feature size; only needed for a non-timm backbone in ``pooled`` mode.

    Attributes:
        best_val_top1: Best validation top-1 in [0, 1] over epochs (the reference's number).
        last_val_top1: Latest validation top-1 in [0, 1].

    Examples:
        >>> probe = LinearProbe(dino.teacher.backbone, num_classes=10)  # doctest: +SKIP
        >>> pl.Trainer(max_epochs=100).fit(probe, train_loader, val_loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        feature_mode: FeatureMode = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"LinearProbe needs num_classes >= 2, got {num_classes}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone.requires_grad_(False).eval()
        self.feature_mode = resolve_feature_mode(backbone, feature_mode)
        dim = feature_dim or probe_feature_dim(backbone, self.feature_mode)
        if dim is None:
            raise ValueError(
                f"cannot read the feature size of a {type(backbone).__name__}; pass feature_dim"
            )
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.best_val_top1: float | None = None
        self.last_val_top1: float | None = None

    def train(self, mode: bool = True) -> LinearProbe:
        """Set train/eval mode on the classifier; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Classify images.

        Args:
            images: Images, shape (B, 3, H, W).

        Returns:
            Logits, shape (B, num_classes).
        """
        with torch.no_grad():
            features = probe_features(self.backbone, images, self.feature_mode)
        return self.classifier(features.float())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the classifier on one ``(images, labels)`` batch."""
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("probe/train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate top-1 accuracy on one ``(images, labels)`` batch."""
        images, labels = batch
        self.val_top1.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        """Log ``probe/val_top1`` and update ``last_val_top1`` / ``best_val_top1``."""
        top1 = self.val_top1.compute()
        self.val_top1.reset()
        self.log("probe/val_top1", top1)
        if self.trainer.sanity_checking:
            return
        self.last_val_top1 = float(top1)
        self.best_val_top1 = max(self.best_val_top1 or 0.0, self.last_val_top1)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD on the classifier only, with lr scaled by the global batch and a cosine schedule."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"LinearProbe anneals over trainer.max_epochs; set it (got {max_epochs})"
            )
        lr = self.hparams.lr * self._global_batch_size() / 256
        optimizer = torch.optim.SGD(
            self.classifier.parameters(),
            lr=lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone's weights from the checkpoint."""
        state = checkpoint["state_dict"]
        for key in [key for key in state if key.startswith("backbone.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put this probe's own backbone weights back, so strict loading sees every key."""
        state = checkpoint["state_dict"]
        for key, value in self.backbone.state_dict().items():
            state.setdefault(f"backbone.{key}", value)

    def _global_batch_size(self) -> int:
        """Per-device train batch size x world size x gradient accumulation."""
        _ = self.trainer.estimated_stepping_batches  # makes the trainer load the train loader
        batch_size = getattr(self.trainer.train_dataloader, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "LinearProbe scales its lr by the train DataLoader's batch_size; use a DataLoader "
                "built with batch_size"
            )
        return batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches


def fit_linear_probe(
    backbone: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    epochs: int,
    feature_mode: FeatureMode = "auto",
    lr: float = 0.001,
    accelerator: str = "auto",
    progress: bool = False,
    **probe_kwargs: Any,
) -> dict[str, float | None]:
    """Train and validate a :class:`LinearProbe` on one device, without logs or checkpoints.

    Args:
        backbone: Frozen feature extractor (frozen in place).
        train_loader: Training ``(images, labels)`` loader (augmented, as in the reference).
        val_loader: Validation ``(images, labels)`` loader, evaluated every epoch.
        num_classes: Number of classes.
        epochs: Training epochs (100 in the reference).
        feature_mode: See :class:`LinearProbe`.
        lr: Base learning rate for a global batch of 256.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        progress: Show Lightning's progress bar.
        **probe_kwargs: Further :class:`LinearProbe` arguments (momentum, weight_decay,
            feature_dim).

    Returns:
        ``{"best_top1": ..., "last_top1": ...}`` as fractions in [0, 1].

    Examples:
        >>> fit_linear_probe(backbone, train_loader, val_loader, 10, epochs=100)  # doctest: +SKIP
        {'best_top1': 0.77, 'last_top1': 0.769}
    """
    probe = LinearProbe(backbone, num_classes, feature_mode=feature_mode, lr=lr, **probe_kwargs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode")
        trainer.fit(probe, train_loader, val_loader)
    return {"best_top1": probe.best_val_top1, "last_top1": probe.last_val_top1}
