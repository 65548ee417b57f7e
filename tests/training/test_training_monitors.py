import pytest
import torch

from lightning_dino.training.monitors import ThroughputLogger, crop_grid
from lightning_dino.training.preflight import crops_of


def test_crop_grid_rows_and_denormalisation():
    crops = [torch.zeros(5, 3, 8, 8), torch.zeros(5, 3, 8, 8), torch.ones(5, 3, 4, 4)]
    grid = crop_grid(crops, n_samples=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    # 2 rows of 3 tiles of 8x8 with 1-px padding around every tile.
    assert grid.shape == (3, 2 * 9 + 1, 3 * 9 + 1)
    assert torch.allclose(grid[:, 1:9, 1:9], torch.full((3, 8, 8), 0.5))  # 0 * 0.25 + 0.5
    assert torch.allclose(grid[:, 1:9, 19:27], torch.full((3, 8, 8), 0.75))  # local crop upsampled


def test_crops_of_accepts_every_batch_layout():
    crops = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 2, 2)]
    for batch in ((crops, torch.zeros(2)), [crops, torch.zeros(2)], crops, {"crops": crops, "label": 0}):
        got = crops_of(batch)
        assert len(got) == 2 and all(a is b for a, b in zip(got, crops, strict=True))
    for bad in (torch.zeros(2, 3, 4, 4), {"images": crops}, [torch.zeros(2, 3)], "crops"):
        with pytest.raises(TypeError, match="a DINO training batch must be"):
            crops_of(bad)


def test_throughput_logger_measures_images_per_second(monkeypatch):
    logged = {}

    class Module:
        def log(self, name, value, batch_size):
            logged[name] = value

    times = iter([10.0, 10.5])
    monkeypatch.setattr("lightning_dino.training.monitors.time.perf_counter", lambda: next(times))
    logger = ThroughputLogger()
    batch = ([torch.zeros(8, 3, 4, 4)], torch.zeros(8))
    logger.on_train_batch_start(None, Module(), batch, 0)
    assert not logged
    logger.on_train_batch_start(None, Module(), batch, 1)
    assert logged["train/images_per_sec"] == pytest.approx(16.0)
