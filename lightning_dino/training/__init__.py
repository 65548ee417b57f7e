"""The training run around a method.

The teacher EMA, schedules, optimisation, checkpointing, preemption, resume, the checks made
before any data is read, and the small monitors.
"""

from lightning_dino.training.checkpointing import DINOCheckpoint, RandomStateCallback
from lightning_dino.training.ema import TeacherEMA, ema_update
from lightning_dino.training.monitors import CropGridLogger, ThroughputLogger
from lightning_dino.training.preemption import TrainingInterrupted
from lightning_dino.training.schedules import StepScheduler, cosine_schedule

__all__ = [
    "CropGridLogger",
    "DINOCheckpoint",
    "RandomStateCallback",
    "StepScheduler",
    "TeacherEMA",
    "ThroughputLogger",
    "TrainingInterrupted",
    "cosine_schedule",
    "ema_update",
]
