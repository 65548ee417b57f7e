"""The crop settings: the reference's defaults, one set of checks, shared by the per-sample and
batched pipelines and the data module (whose flat arguments default to them)."""

import inspect

import pytest
import torch

from lightning_dino.data import BatchedMultiCropTransform, MultiCropDataModule, MultiCropTransform
from lightning_dino.data.crops import CROP_SETTINGS, DEFAULT_CROPS, CropSettings, crop_settings
from lightning_dino.setting_names import cli_flags

# DataAugmentationDINO of facebookresearch/dino main_dino.py (and its argparse defaults).
REFERENCE = {
    "global_crop_size": 224, "local_crop_size": 96, "n_local_crops": 8,
    "global_crop_scale": (0.4, 1.0), "local_crop_scale": (0.05, 0.4), "n_global_crops": 2,
    "hflip_p": 0.5, "color_jitter": (0.4, 0.4, 0.2, 0.1), "color_jitter_p": 0.8,
    "grayscale_p": 0.2, "blur_p": (1.0, 0.1, 0.5), "blur_sigma": (0.1, 2.0), "solarize_p": 0.2,
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
}
BAD = [
    ("global_crop_size", 0), ("local_crop_size", -1), ("n_global_crops", 0), ("n_local_crops", -1),
    ("global_crop_scale", (0.5, 0.4)), ("local_crop_scale", (0.0, 0.4)), ("global_crop_scale", (0.4,)),
    ("color_jitter", (0.4, 0.4, 0.2)), ("color_jitter", (0.4, 0.4, 0.2, 0.6)), ("hflip_p", 1.5),
    ("color_jitter_p", -0.1), ("grayscale_p", 2), ("solarize_p", -1), ("blur_p", (1.0, 0.1)),
    ("blur_p", (1.0, 0.1, 1.5)), ("blur_sigma", (2.0, 0.1)), ("mean", (0.5, 0.5)), ("std", (0.2, 0.2, 0.0)),
]


def test_the_defaults_are_the_references():
    assert DEFAULT_CROPS.as_dict() == REFERENCE
    assert tuple(REFERENCE) == CROP_SETTINGS
    assert DEFAULT_CROPS.n_crops == 10


@pytest.mark.parametrize(("name", "value"), BAD)
def test_every_bad_value_is_refused_naming_it_on_every_path(name, value):
    for build in (CropSettings, MultiCropTransform, BatchedMultiCropTransform):
        with pytest.raises(ValueError, match=rf"^{name} "):
            build(**{name: value})
    with pytest.raises(ValueError, match=rf"^MultiCropDataModule\({name}="):
        MultiCropDataModule(**{name: value})
    with cli_flags(), pytest.raises(ValueError, match=rf"^--data\.{name} "):
        MultiCropDataModule(**{name: value})


def test_the_data_module_defaults_are_the_settings_defaults():
    parameters = inspect.signature(MultiCropDataModule).parameters
    assert {name: parameters[name].default for name in CROP_SETTINGS} == REFERENCE
    data = MultiCropDataModule(global_crop_size=32, local_crop_size=16, n_local_crops=2)
    assert data.crops == CropSettings(32, 16, 2)
    assert data.train_transform.crops is data.crops


def test_the_pipelines_take_the_settings_positionally_by_name_or_as_one_object():
    settings = CropSettings(global_crop_size=24, local_crop_size=12, n_local_crops=3)
    for transform in (MultiCropTransform, BatchedMultiCropTransform):
        assert transform(24, 12, 3).crops == settings
        assert transform(settings).crops is settings
        assert transform(settings, n_local_crops=1).crops == CropSettings(24, 12, 1)
    crops = BatchedMultiCropTransform(settings)(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))
    assert [tuple(c.shape) for c in crops] == [(2, 3, 24, 24)] * 2 + [(2, 3, 12, 12)] * 3


def test_lists_from_a_config_become_tuples_and_unknown_names_are_refused():
    assert crop_settings(global_crop_scale=[0.3, 1], mean=[0, 0, 0]).global_crop_scale == (0.3, 1.0)
    with pytest.raises(TypeError, match="global_size"):
        crop_settings(global_size=32)
