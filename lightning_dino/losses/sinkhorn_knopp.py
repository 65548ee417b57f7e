"""Sinkhorn-Knopp centring of the teacher (SwAV; DINOv2's alternative to the EMA centre).

Reference: Caron et al., *Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments* (SwAV), NeurIPS 2020; ``sinkhorn_knopp_teacher`` of facebookresearch/dinov2
``dinov2/loss/dino_clstoken_loss.py``, which this follows step for step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dino.losses.precision import full_precision


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets whose prototypes are used equally over the (global) batch.

    ``Q = exp(logits / teacher_temp)``, transposed to (K, N) and normalised to sum 1; then
    ``n_iterations`` times: every prototype's row is scaled to total 1/K, then every sample's
    column to total 1/N. Returned as (N, K) with rows summing to 1. Under DDP the row count, the
    total and the per-prototype sums are all-reduced, so N counts every rank's rows even when
    ranks hold different numbers of rows (masked patches), as in DINOv2.

    The logits are shifted by their (all-reduced) maximum before ``exp`` (a constant factor the
    first normalisation removes) and the iterations run in float64: the result is DINOv2's to
    fp32 rounding, without the overflow DINOv2's fp32 ``exp`` hits once logits / temperature
    exceed 88 (logits of 4 at temperature 0.04).

    Args:
        teacher_logits: Raw teacher logits (N, K), the rows of every global crop together.
        teacher_temp: Teacher temperature.
        n_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).

    Returns:
        fp32 probabilities (N, K).

    Examples:
        >>> targets = sinkhorn_knopp(torch.randn(8, 4), teacher_temp=0.07)
        >>> torch.allclose(targets.sum(dim=1), torch.ones(8))  # each sample's row: a distribution
        True
    """
    with full_precision(teacher_logits.device):
        logits = teacher_logits.detach().double()
        # Every rank's row count (ranks may hold different numbers of masked patches) and the
        # largest logit, all-reduced; a rank without rows still joins every collective.
        top = logits.max() if logits.numel() else torch.tensor(-torch.inf, dtype=logits.dtype)
        n_rows_tensor = torch.tensor(float(logits.shape[0]), dtype=logits.dtype)
        top, n_rows_tensor = top.to(logits.device), n_rows_tensor.to(logits.device)
        if _distributed():
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            dist.all_reduce(n_rows_tensor)
        q = torch.exp((logits - top) / teacher_temp).T  # (K, N)
        n_rows = float(n_rows_tensor)
        n_prototypes = q.shape[0]
        total = q.sum()
        if _distributed():
            dist.all_reduce(total)
        q /= total
        tiny = torch.finfo(q.dtype).tiny  # a prototype no sample uses stays 0 instead of NaN
        for _ in range(n_iterations):
            per_prototype = q.sum(dim=1, keepdim=True)
            if _distributed():
                dist.all_reduce(per_prototype)
            q /= per_prototype.clamp_(min=tiny)
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_(min=tiny)
            q /= n_rows
        q *= n_rows
        return q.T.float()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
