"""The EMA centre of teacher logits, shared by the DINO and iBOT losses.

The centre is an EMA of the batch mean of raw teacher logits (DINO paper, Eq. 4). Statistics are
accumulated per forward and applied once per optimizer step (:meth:`EMACenter.update_center`),
after an all-reduce over every process: so under gradient accumulation and DDP the centre moves
once per step, by the mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class EMACenter(nn.Module):
    """Base of a loss with a centre buffer ``center`` (1, K) and its pending statistics.

    Subclasses call :meth:`init_center` in ``__init__`` and set ``center_momentum``.
    """

    center: Tensor
    _pending_sum: Tensor
    _pending_count: Tensor
    center_momentum: float
    out_dim: int

    def init_center(self, out_dim: int) -> None:
        """Register the centre (saved in checkpoints) and its pending sums (not saved).

        Args:
            out_dim: Number of prototypes K.
        """
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("_pending_sum", torch.zeros(out_dim), persistent=False)
        self.register_buffer("_pending_count", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def reset_center(self) -> None:
        """Set the centre back to 0 and drop accumulated statistics (a new run starts)."""
        self.center.zero_()
        self._pending_sum.zero_()
        self._pending_count.zero_()

    @torch.no_grad()
    def accumulate_center(self, teacher_out: Tensor) -> None:
        """Add a batch of raw teacher logits to the statistics of the next centre update.

        Args:
            teacher_out: Raw teacher logits, shape (..., K).
        """
        flat = teacher_out.detach().float().reshape(-1, self.out_dim)
        self._pending_sum += flat.sum(dim=0)
        self._pending_count += flat.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the accumulated teacher statistics: ``c <- m c + (1 - m) mean``.

        The sum and count are all-reduced over every process first, so the mean is the global
        mean over all ranks' rows. Does nothing when nothing was accumulated.
        """
        stats = torch.cat([self._pending_sum, self._pending_count.reshape(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        count = stats[-1]
        if count > 0:
            batch_center = (stats[:-1] / count).unsqueeze(0)
            self.center.mul_(self.center_momentum).add_(
                batch_center, alpha=1 - self.center_momentum
            )
        self._pending_sum.zero_()
        self._pending_count.zero_()

