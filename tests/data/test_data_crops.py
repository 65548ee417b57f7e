"""The crop settings: the reference's defaults, one set of checks, shared by the per-sample and
batched pipelines and the data module (whose flat arguments default to them); the Gram crops
(DINOv3's) on every path: the global boxes and flips, undistorted."""

import inspect

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from lightning_dino.data import BatchedMultiCropTransform, MultiCropDataModule, MultiCropTransform
from lightning_dino.data.crops import CROP_SETTINGS, DEFAULT_CROPS, CropSettings, crop_settings
from lightning_dino.setting_names import cli_flags

# DataAugmentationDINO of facebookresearch/dino main_dino.py (and its argparse defaults).
REFERENCE = {
    "global_crop_size": 224, "local_crop_size": 96, "n_local_crops": 8,
    "global_crop_scale": (0.4, 1.0), "local_crop_scale": (0.05, 0.4), "n_global_crops": 2,
    "hflip_p": 0.5, "color_jitter": (0.4, 0.4, 0.2, 0.1), "color_jitter_p": 0.8,
    "grayscale_p": 0.2, "blur_p": (1.0, 0.1, 0.5), "blur_sigma": (0.1, 2.0), "solarize_p": 0.2,
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "gram_crop_size": 0,
}
BAD = [
    ("global_crop_size", 0), ("local_crop_size", -1), ("n_global_crops", 0), ("n_local_crops", -1),
    ("global_crop_scale", (0.5, 0.4)), ("local_crop_scale", (0.0, 0.4)), ("global_crop_scale", (0.4,)),
    ("color_jitter", (0.4, 0.4, 0.2)), ("color_jitter", (0.4, 0.4, 0.2, 0.6)), ("hflip_p", 1.5),
    ("color_jitter_p", -0.1), ("grayscale_p", 2), ("solarize_p", -1), ("blur_p", (1.0, 0.1)),
    ("blur_p", (1.0, 0.1, 1.5)), ("blur_sigma", (2.0, 0.1)), ("mean", (0.5, 0.5)), ("std", (0.2, 0.2, 0.0)),
    ("gram_crop_size", -1),
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


# Gram crops (DINOv3's gram_teacher_crops_size with gram_teacher_no_distortions, in
# dinov3/data/augmentations.py): each global crop's own box and flip, resampled at the Gram size,
# without colour, grayscale, blur or solarisation, normalised.
DISTORTING = {"global_crop_size": 16, "local_crop_size": 8, "n_local_crops": 1, "gram_crop_size": 32,
              "color_jitter_p": 1.0, "grayscale_p": 1.0, "blur_p": (1.0, 1.0, 1.0), "solarize_p": 1.0,
              "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def recorded_boxes(monkeypatch, module):
    boxes = []
    real = module.sample_crop_boxes

    def record(*args, **kwargs):
        boxes.append(real(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(module, "sample_crop_boxes", record)
    return boxes


def expected_gram(image, box, size, flip):
    """The box resampled by torchvision (bicubic, antialiased), flipped, normalised: by hand."""
    top, left, h, w = (int(v) for v in box)
    crop = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
    crop = crop.flip(-1) if flip else crop
    return (crop.expand(3, -1, -1).float() / 255 - 0.5) / 0.25


def colour_image(height=40, width=52):
    """A smooth colour image (coarse noise, upsampled): resampling errors stay small."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 6, 6, generator=gen)
    return (torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")[0] * 255).round().to(torch.uint8)


def matches_either_flip(gram, image, box, size, atol, mean_atol=1e-6):
    """The Gram crop is the box, flipped or not: within ``atol`` everywhere and ``mean_atol`` on average."""
    differences = [(gram - expected_gram(image, box, size, flip)).abs() for flip in (False, True)]
    return any(float(d.max()) <= atol and float(d.mean()) <= mean_atol for d in differences)


def test_per_sample_gram_crops_are_the_global_boxes_undistorted(monkeypatch):
    import lightning_dino.data.transforms as transforms_module
    boxes = recorded_boxes(monkeypatch, transforms_module)
    torch.manual_seed(0)
    image = colour_image()
    out = MultiCropTransform(**DISTORTING)(image)
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
    assert len(out["gram_crops"]) == 2 and len(boxes) == 2
    for gram, box in zip(out["gram_crops"], boxes, strict=True):
        assert gram.shape == (3, 32, 32)
        assert matches_either_flip(gram, image, box[0], 32, atol=1e-6)  # exact: no distortion


@pytest.mark.parametrize("sizes", [[(40, 52)] * 3, [(40, 52), (61, 45), (48, 48)]])
def test_batched_and_device_gram_crops_are_the_global_boxes_undistorted(monkeypatch, sizes):
    import lightning_dino.data.batched as batched_module
    boxes = recorded_boxes(monkeypatch, batched_module)
    torch.manual_seed(0)
    images = [colour_image(*size) for size in sizes]
    out = BatchedMultiCropTransform(**DISTORTING).augment(images)
    assert set(out) == {"crops", "gram_crops"} and len(out["gram_crops"]) == 2
    if len(set(sizes)) == 1:  # one box draw for the batch, view-major; resampled in float (not
        # rounded to uint8 between the steps: within a grey level, 1/255 = 0.016 here)
        global_boxes, atol, mean_atol = boxes[0].view(2, len(images), 4), 0.04, 0.01
        def box_of(view, index): return global_boxes[view, index]
    else:  # each image's global boxes, then its local ones; the uint8 pixels of torchvision
        global_boxes, atol, mean_atol = boxes[0::2], 1e-6, 1e-6
        def box_of(view, index): return global_boxes[index][view]
    for view, gram in enumerate(out["gram_crops"]):
        assert gram.shape == (len(images), 3, 32, 32)
        for index, image in enumerate(images):
            assert matches_either_flip(gram[index], image, box_of(view, index), 32, atol, mean_atol)


def test_the_student_and_gram_crops_share_their_flip():
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(3, 64, 64).contiguous()  # dark left, bright right
    plain = {**DISTORTING, "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": (0.0, 0.0, 0.0), "solarize_p": 0.0,
             "global_crop_scale": (0.5, 1.0)}
    rising = lambda crop: bool(crop[0, :, -1].mean() > crop[0, :, 0].mean())  # noqa: E731
    torch.manual_seed(0)
    per_sample = [MultiCropTransform(**plain)(ramp) for _ in range(12)]
    pairs = [(rising(s), rising(g)) for out in per_sample for s, g in zip(out["crops"][:2], out["gram_crops"], strict=True)]
    batched = BatchedMultiCropTransform(**plain)(ramp.expand(12, -1, -1, -1).contiguous())
    pairs += [(rising(s), rising(g)) for view in range(2) for s, g in zip(batched["crops"][view], batched["gram_crops"][view], strict=True)]
    assert all(student == gram for student, gram in pairs)
    assert {student for student, _ in pairs} == {True, False}  # both orientations occurred


def test_the_data_module_makes_dict_batches_with_gram_crops_on_every_path():
    settings = {"dataset": "synthetic", "batch_size": 4, "num_workers": 0, "synthetic_size": 8,
                "synthetic_image_size": 32, "global_crop_size": 16, "local_crop_size": 8, "n_local_crops": 2,
                "gram_crop_size": 24}
    for augmentation in ("per_sample", "batched", "device"):
        data = MultiCropDataModule(**settings, augmentation=augmentation)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        if augmentation == "device":
            batch = data.on_after_batch_transfer(batch, 0)
        assert set(batch) == {"crops", "gram_crops", "labels"}, augmentation
        assert [tuple(c.shape) for c in batch["gram_crops"]] == [(4, 3, 24, 24)] * 2
        assert [tuple(c.shape[-2:]) for c in batch["crops"]] == [(16, 16)] * 2 + [(8, 8)] * 2
