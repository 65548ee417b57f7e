"""Two gloo processes on the CPU: the centre is the mean over every rank's global crops."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_dino import DINOLoss

OUT_DIM = 8


def rank_teacher_logits(rank: int) -> torch.Tensor:
    # Different batch sizes per rank, so a mean of per-rank means would be wrong.
    return torch.randn(2, 3 + 2 * rank, OUT_DIM, generator=torch.Generator().manual_seed(rank))


def _centre_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        teacher = rank_teacher_logits(rank)
        student = torch.randn(4, teacher.shape[1], OUT_DIM)
        loss_fn = DINOLoss(OUT_DIM, center_momentum=0.9)
        loss_fn(student, teacher, 0.04)
        results[rank] = loss_fn.center.clone()
    finally:
        dist.destroy_process_group()


def test_centre_is_global_mean_over_ranks(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_centre_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    all_logits = torch.cat([rank_teacher_logits(r).reshape(-1, OUT_DIM) for r in range(2)])
    expected = 0.1 * all_logits.mean(dim=0, keepdim=True)
    torch.testing.assert_close(results[0], expected)
    torch.testing.assert_close(results[1], expected)
