"""Every loss of the package, computed in fp32 whatever the autocast around it.

DINO's cross-entropy with its EMA centre (:class:`DINOLoss`), DINOv2's iBOT masked-patch loss
(:class:`iBOTPatchLoss`), KoLeo regulariser (:class:`KoLeoLoss`) and Sinkhorn-Knopp centring
(:func:`sinkhorn_knopp`), DINOv3's Gram anchoring (:class:`GramLoss`), and the optional terms that
wrap them for :class:`~lightning_dino.DINO` (:mod:`lightning_dino.losses.terms`).
"""

from lightning_dino.losses.center import EMACenter
from lightning_dino.losses.dino import DINOLoss
from lightning_dino.losses.gram import GramLoss
from lightning_dino.losses.ibot import iBOTPatchLoss
from lightning_dino.losses.koleo import KoLeoLoss
from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.sinkhorn_knopp import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "EMACenter",
    "GramLoss",
    "KoLeoLoss",
    "full_precision",
    "iBOTPatchLoss",
    "sinkhorn_knopp",
]
