"""lightning_dino: faithful, fast DINO self-supervised pre-training for PyTorch Lightning."""

from lightning_dino.data import MultiCropDataModule, MultiCropTransform
from lightning_dino.data.prepared.writer import prepare_streaming_dataset
from lightning_dino.data.sampler import EpochSampler, ResumableDataLoader
from lightning_dino.dino import DINO
from lightning_dino.distillation import Distillation
from lightning_dino.eval import (
    AttentionMapMonitor,
    CollapseMonitor,
    KNNMonitor,
    LinearProbe,
    attention_maps,
    collapse_statistics,
    knn_accuracy,
)
from lightning_dino.io.embed import embed_images, load_embeddings
from lightning_dino.io.export import export_backbone, load_backbone
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.gram import GramLoss
from lightning_dino.losses.ibot import iBOTPatchLoss
from lightning_dino.losses.koleo import KoLeoLoss
from lightning_dino.losses.sinkhorn_knopp import sinkhorn_knopp
from lightning_dino.networks.head import DINOHead
from lightning_dino.training.checkpointing import DINOCheckpoint, RandomStateCallback
from lightning_dino.training.ema import TeacherEMA, ema_update
from lightning_dino.training.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.training.preemption import TrainingInterrupted
from lightning_dino.training.schedules import StepScheduler
from lightning_dino.training.sharding import FSDP2Strategy
from lightning_dino.version import __version__

__all__ = [
    "DINO",
    "AttentionMapMonitor",
    "CollapseMonitor",
    "CropGridLogger",
    "DINOCheckpoint",
    "DINOHead",
    "DINOLoss",
    "Distillation",
    "EpochSampler",
    "FSDP2Strategy",
    "GramLoss",
    "KNNMonitor",
    "KoLeoLoss",
    "LinearProbe",
    "MultiCropDataModule",
    "MultiCropTransform",
    "RandomStateCallback",
    "ResumableDataLoader",
    "StepScheduler",
    "TeacherEMA",
    "ThroughputLogger",
    "TrainingInterrupted",
    "__version__",
    "attention_maps",
    "collapse_statistics",
    "ema_update",
    "embed_images",
    "export_backbone",
    "iBOTPatchLoss",
    "knn_accuracy",
    "load_backbone",
    "load_embeddings",
    "prepare_streaming_dataset",
    "sinkhorn_knopp",
]
