"""lightning_dino: faithful, fast DINO self-supervised pre-training for PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_dino.head import DINOHead
from lightning_dino.loss import DINOLoss
from lightning_dino.module import DINO
from lightning_dino.teacher import TeacherEMA, ema_update

__all__ = ["DINO", "DINOHead", "DINOLoss", "TeacherEMA", "__version__", "ema_update"]
