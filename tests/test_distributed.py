"""Two gloo processes on the CPU: the centre is the mean over every rank's global crops."""

import pytest
import torch

from lightning_dino import DINOLoss
from tests.conftest import run_on_gloo

OUT_DIM = 8


def rank_teacher_logits(rank: int) -> torch.Tensor:
    # Different batch sizes per rank, so a mean of per-rank means would be wrong.
    return torch.randn(2, 3 + 2 * rank, OUT_DIM, generator=torch.Generator().manual_seed(rank))


def _centre_of_rank(rank: int) -> torch.Tensor:
    teacher = rank_teacher_logits(rank)
    student = torch.randn(4, teacher.shape[1], OUT_DIM)
    loss_fn = DINOLoss(OUT_DIM, center_momentum=0.9)
    loss_fn(student, teacher, 0.04)
    return loss_fn.center.clone()


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_centre_is_global_mean_over_ranks(tmp_path):
    results = run_on_gloo(_centre_of_rank, tmp_path)
    all_logits = torch.cat([rank_teacher_logits(r).reshape(-1, OUT_DIM) for r in range(2)])
    expected = 0.1 * all_logits.mean(dim=0, keepdim=True)
    torch.testing.assert_close(results[0], expected)
    torch.testing.assert_close(results[1], expected)
