"""DINOv3's high-resolution adaptation: crop-size triples drawn once per step with fixed
probabilities, the same on every rank, the same again on resume, on every augmentation path."""

import pytest
import torch

from lightning_dino.data import MultiCropDataModule
from lightning_dino.data.crops import CropSettings
from lightning_dino.data.sampler import EpochSampler
from lightning_dino.data.size_mix import CropSizeMix
from lightning_dino.setting_names import cli_flags

# dinov3_vit7b16_high_res_adapt.yaml: (global, local, gram) -> probability
OFFICIAL = [[512, 112, 768, 0.3], [768, 112, 1152, 0.3], [768, 168, 1152, 0.3], [768, 224, 1152, 0.05],
            [768, 336, 1152, 0.05]]
TINY = [[32, 16, 48, 0.5], [48, 16, 64, 0.3], [48, 24, 64, 0.2]]
DATA = {"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "synthetic_size": 64, "synthetic_image_size": 64,
        "n_local_crops": 2, "crop_size_mix": TINY}


def test_the_official_mix_parses_and_draws_its_probabilities():
    mix = CropSizeMix(OFFICIAL, CropSettings())
    assert [(v.global_crop_size, v.local_crop_size, v.gram_crop_size) for v in mix.variants] == [
        (512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152), (768, 336, 1152)]
    draws = torch.tensor([mix.choice(0, epoch, step) for epoch in range(4) for step in range(2500)])
    frequencies = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.3, 0.3, 0.3, 0.05, 0.05], dtype=torch.float64),
                               atol=0.015, rtol=0)
    assert [mix.choice(0, 1, s) for s in range(50)] == [mix.choice(0, 1, s) for s in range(50)]  # a pure function
    assert [mix.choice(0, 1, s) for s in range(50)] != [mix.choice(1, 1, s) for s in range(50)]  # seeded
    assert mix.sizes() == {"global": [512, 768], "local": [112, 168, 224, 336], "gram": [768, 1152]}


@pytest.mark.parametrize("rows", [[[32, 16, 0, 0.5]], [[32, 16, 0, 0.5], [0, 16, 0, 0.5]], [[32, 16, 0.5]], []])
def test_a_bad_mix_is_named(rows):
    with cli_flags(), pytest.raises(ValueError, match=r"--data\.crop_size_mix=.* is invalid: give rows"):
        MultiCropDataModule(crop_size_mix=rows)


def tags_of(sampler, epoch):
    sampler.set_epoch(epoch)
    return [tag for _, tag in sampler]


def test_every_rank_tags_a_step_alike_and_a_resumed_epoch_continues_the_draws():
    mix = CropSizeMix(TINY, CropSettings())
    ranks = [EpochSampler(range(64), num_replicas=2, rank=rank, seed=3) for rank in range(2)]
    for sampler in ranks:
        sampler.tag_batches(mix.choice, 4)
    per_rank = [tags_of(sampler, 2) for sampler in ranks]
    assert per_rank[0] == per_rank[1]  # 8 steps of 4 images per rank, one tag a step
    steps = per_rank[0][::4]
    assert steps == [mix.choice(3, 2, step) for step in range(8)] and len(set(steps)) > 1
    resumed = EpochSampler(range(64), num_replicas=2, rank=1, seed=3)
    resumed.tag_batches(mix.choice, 4)
    resumed.set_epoch(2)
    resumed.start = 3 * 4 * 2  # 3 steps of both ranks done before the interruption
    assert [tag for _, tag in resumed] == per_rank[1][12:]


@pytest.mark.parametrize("augmentation", ["per_sample", "batched", "device"])
def test_batches_take_the_sizes_of_their_steps_draw(augmentation):
    data = MultiCropDataModule(**DATA, augmentation=augmentation)
    data.setup("fit")
    loader = data.train_dataloader()
    mix, seen = data.size_mix, []
    for step, batch in enumerate(loader):
        if augmentation == "device":
            batch = data.on_after_batch_transfer(batch, 0)
        want = mix.variants[mix.choice(0, 0, step)]
        assert [tuple(c.shape[-2:]) for c in batch["crops"]] == (
            [(want.global_crop_size,) * 2] * 2 + [(want.local_crop_size,) * 2] * 2)
        assert [tuple(c.shape[-2:]) for c in batch["gram_crops"]] == [(want.gram_crop_size,) * 2] * 2
        seen.append(want.global_crop_size)
    assert len(seen) == 16 and set(seen) == {32, 48}
