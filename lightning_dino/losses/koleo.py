"""The KoLeo regulariser of DINOv2: spread the student's features uniformly over the sphere.

Reference: Oquab et al., *DINOv2: Learning Robust Visual Features without Supervision*, TMLR
2024, section 4 ("KoLeo regularizer", after Sablayrolles et al. 2019); ``KoLeoLoss`` in
facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.term import LossTerm
from lightning_dino.networks.backbones import MultiCropNetwork
from lightning_dino.networks.forward import FEATURES, StepOutputs
from lightning_dino.setting_names import setting


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: ``-mean_i log(||x_i - x_nn(i)|| + eps)``.

    The rows are L2-normalised first; ``nn(i)`` is the row with the largest inner product with
    row i among the others. Minimising the loss pushes every feature away from its nearest
    neighbour. DINOv2 applies it to the student's class tokens (before the head), separately per
    global crop so that two crops of one image are never neighbours, with weight 0.1. Computed
    in fp32 whatever the autocast.

    Args:
        eps: Added to the norms (normalisation and distance), as DINOv2's 1e-8.

    Examples:
        >>> loss = KoLeoLoss()(torch.randn(16, 32))
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """The loss of a batch of features.

        Args:
            x: Features (B, D), B >= 2.

        Returns:
            Scalar fp32 loss.

        Raises:
            ValueError: If there are fewer than 2 rows (no neighbour; DINOv2 gives NaN).
        """
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs (B, D) features with B >= 2, got {tuple(x.shape)}")
        with full_precision(x.device):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)  # below any inner product of unit vectors: never chosen
            neighbour = dots.argmax(dim=1)
            distances = torch.linalg.vector_norm(x - x[neighbour], dim=-1)
            return -torch.log(distances + self.eps).mean()


class KoLeoTerm(LossTerm):
    """DINOv2's KoLeo term of :class:`~lightning_dino.DINO`.

    The sum over the global crops of :class:`KoLeoLoss` on the student's backbone features of
    that crop: per global crop, so that two crops of one image are never each other's
    neighbour (DINOv2).

    Arguments of :class:`~lightning_dino.DINO` (``--model.*``):

    - ``koleo_loss_weight``: the weight (0 = off; 0.1 in DINOv2). Needs at least two images per
      device (each image's nearest neighbour is another image of its batch).

    Args:
        weight: The term's weight (0.1 in DINOv2).
    """

    name = "koleo"
    needs = frozenset({FEATURES})

    def __init__(self, weight: float) -> None:
        super().__init__(weight)
        self.loss = KoLeoLoss()

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> KoLeoTerm:
        """The term weighted by ``koleo_loss_weight``."""
        return cls(hparams.koleo_loss_weight)

    def check_batch_size(self, batch_size: int, owner: object) -> None:
        """Each image's nearest neighbour is another image of the same device: two at least."""
        if batch_size > 1:
            return
        raise ValueError(
            f"{setting(owner, 'koleo_loss_weight', self.weight)} needs at least 2 images per "
            f"device (each image's nearest neighbour in the batch), but "
            f"{setting('data', 'batch_size', batch_size)}; use {setting('data', 'batch_size')} "
            f">= 2 or {setting(owner, 'koleo_loss_weight', 0)}"
        )

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """KoLeo of each global crop's student features (n_global of (B, D)), summed."""
        return sum(self.loss(f) for f in outputs.features[: outputs.n_global])
