"""The KoLeo regulariser of DINOv2: spread the student's features uniformly over the sphere.

Reference: Oquab et al., *DINOv2: Learning Robust Visual Features without Supervision*, TMLR
2024, section 4 ("KoLeo regularizer", after Sablayrolles et al. 2019); ``KoLeoLoss`` in
facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dino.losses.precision import full_precision
from lightning_dino.losses.term import Check, LossTerm
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


def koleo_over_ranks(x: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """KoLeo of this rank's rows, their neighbours sought among a group of ranks' rows.

    DINOv3's distributed KoLeo (``koleo_distributed_loss_group_size``, in
    ``dinov3/loss/koleo_loss.py``): the L2-normalised rows of every rank are gathered
    (differentiably, so neighbours on other ranks receive gradients), split into groups of
    ``group_size`` consecutive rows (consecutive ranks), and each of this rank's rows takes its
    nearest neighbour in its own group, itself excluded. Computed in fp32.

    Args:
        x: This rank's features (B, D).
        group_size: Rows per group: a multiple of B that divides the global batch.
        eps: Added to the norms (normalisation and distance), as DINOv2's and DINOv3's 1e-8.

    Returns:
        Scalar fp32 loss ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over this rank's rows.

    Raises:
        ValueError: If ``group_size`` is not a multiple of B dividing the global batch.
    """
    batch = x.shape[0]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if group_size % batch or (world * batch) % group_size or group_size < 2:
        raise ValueError(
            f"a KoLeo group of {group_size} images needs a multiple of the {batch} images per "
            f"device that divides the {world * batch} images of all devices"
        )
    with full_precision(x.device):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        everyone = torch.cat(dist_nn.all_gather(x)) if world > 1 else x
        rank = dist.get_rank() if world > 1 else 0
        group = rank * batch // group_size
        members = everyone[group * group_size : (group + 1) * group_size]
        own = rank * batch - group * group_size + torch.arange(batch, device=x.device)
        with torch.no_grad():
            dots = x @ members.T
            dots[torch.arange(batch, device=x.device), own] = -2.0  # never oneself
            neighbour = dots.argmax(dim=1)
        distances = torch.linalg.vector_norm(x - members[neighbour], dim=-1)
        return -torch.log(distances + eps).mean()


class KoLeoTerm(LossTerm):
    """DINOv2's KoLeo term of :class:`~lightning_dino.DINO`.

    The sum over the global crops of :class:`KoLeoLoss` on the student's backbone features of
    that crop: per global crop, so that two crops of one image are never each other's
    neighbour (DINOv2).

    Arguments of :class:`~lightning_dino.DINO` (``--model.*``):

    - ``koleo_loss_weight``: the weight (0 = off; 0.1 in DINOv2). Needs at least two images per
      device (each image's nearest neighbour is another image of its batch).
    - ``koleo_group_size``: 0 (default) seeks each image's neighbour on its own device, as
      DINOv2; n > 0 among the n images of a group of consecutive devices
      (:func:`koleo_over_ranks`; DINOv3's ``koleo_distributed_loss_group_size``, 16 in its
      high-resolution phase): a multiple of the images per device.

    Args:
        weight: The term's weight (0.1 in DINOv2).
    """

    name = "koleo"
    needs = frozenset({FEATURES})

    def __init__(self, weight: float, group_size: int = 0) -> None:
        super().__init__(weight)
        self.loss = KoLeoLoss()
        self.group_size = group_size

    @classmethod
    def argument_checks(cls, hparams: Any) -> list[Check]:
        """The weight and the group size."""
        group = hparams.get("koleo_group_size", 0)
        return [*super().argument_checks(hparams),
                (group == 0 or group >= 2, "koleo_group_size", "use 0 (per device) or >= 2")]

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> KoLeoTerm:
        """The term weighted by ``koleo_loss_weight``, over ``koleo_group_size`` images."""
        return cls(hparams.koleo_loss_weight, hparams.get("koleo_group_size", 0))

    def check_batch_size(self, batch_size: int, owner: object) -> None:
        """Two images per device at least; a group size that is a multiple of the batch."""
        if self.group_size and self.group_size % batch_size:
            raise ValueError(
                f"{setting(owner, 'koleo_group_size', self.group_size)} must be a multiple of "
                f"the images per device ({setting('data', 'batch_size', batch_size)})"
            )
        if batch_size > 1 or self.group_size:
            return
        raise ValueError(
            f"{setting(owner, 'koleo_loss_weight', self.weight)} needs at least 2 images per "
            f"device (each image's nearest neighbour in the batch), but "
            f"{setting('data', 'batch_size', batch_size)}; use {setting('data', 'batch_size')} "
            f">= 2 or {setting(owner, 'koleo_loss_weight', 0)}"
        )

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """KoLeo of each global crop's student features (n_global of (B, D)), summed."""
        crops = outputs.features[: outputs.n_global]
        if self.group_size:
            return sum(koleo_over_ranks(f, self.group_size) for f in crops)
        return sum(self.loss(f) for f in crops)
