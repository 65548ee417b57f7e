"""The batched multi-crop augmentation draws from the per-sample transform's distributions.

Each building block is checked against torchvision's functional op on float images (exact up
to float error); the whole pipeline is checked for shapes and ranges, per-view probabilities
(blur 1.0 / 0.1 / 0.5, solarisation 0 / 0.2 / 0, flip, jitter, grayscale) and per-view pixel
statistics against :class:`MultiCropTransform` on the same images.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lightning_dino.data import MultiCropDataModule, MultiCropTransform, make_synthetic_images
from lightning_dino.data import batched as batched_module
from lightning_dino.data.batched import (
    BatchedMultiCropTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur,
    resize_weights,
    sample_crop_boxes,
)
from lightning_dino.data.crops import IMAGENET_MEAN, IMAGENET_STD

NO_PHOTOMETRIC = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "hflip_p": 0.0, "solarize_p": 0.0}
FULL_IMAGE = {"global_crop_scale": (1.0, 1.0), "local_crop_scale": (1.0, 1.0)}
N = 2000  # samples per probability estimate: 4 standard deviations of p=0.5 is 0.045


def pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return view * std + mean


def constant(value, channels=1, size=16, n=N) -> torch.Tensor:
    colour = torch.tensor(value, dtype=torch.uint8).view(1, channels, 1, 1)
    return colour.expand(n, channels, size, size).contiguous()


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtype_and_range(channels):
    torch.manual_seed(0)
    transform = BatchedMultiCropTransform(24, 12, n_local_crops=3)
    images = torch.randint(0, 256, (5, channels, 30, 40), dtype=torch.uint8)
    crops = transform(images)
    assert transform.n_crops == len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 3
    for crop in crops:
        assert crop.dtype == torch.float32 and crop.is_contiguous()
        values = pixels(crop)
        assert values.min() >= -1e-5 and values.max() <= 1 + 1e-5


def test_invalid_arguments_and_inputs_are_rejected_like_the_per_sample_transform():
    with pytest.raises(ValueError, match=r"^blur_p"):
        BatchedMultiCropTransform(blur_p=(1.0, 2.0, 0.5))
    with pytest.raises(ValueError, match="uint8 batch"):
        BatchedMultiCropTransform()(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="uint8 images"):
        BatchedMultiCropTransform(16, 8).augment_images([torch.zeros(3, 20, 20), torch.zeros(3, 24, 20)])


@pytest.mark.parametrize("out_size", [7, 16, 24, 40])
def test_crop_and_resize_equals_torchvision_bicubic_antialias(out_size):
    torch.manual_seed(0)
    image = torch.rand(4, 3, 24, 30)
    boxes = torch.tensor([[0, 0, 24, 30], [3, 5, 10, 13], [1, 2, 20, 7], [0, 6, 24, 24]])
    wy = resize_weights(boxes[:, 0], boxes[:, 2], 24, out_size)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], 30, out_size)
    ours = torch.einsum("bsh,bchw,btw->bcst", wy, image, wx)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        reference = TF.resized_crop(
            image[b],
            top,
            left,
            h,
            w,
            [out_size, out_size],
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )
        torch.testing.assert_close(ours[b], reference, atol=2e-6, rtol=0)


def test_colour_ops_and_blur_equal_torchvision_per_image():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 12, 14)
    factors = torch.tensor([0.6, 1.4, 1.0, 0.8, 1.2])
    hues = torch.tensor([-0.1, 0.05, 0.3, 0.0, -0.5])
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0, 1.5])
    copies = {name: images.clone() for name in ("brightness", "contrast", "saturation")}
    ours = {
        "brightness": adjust_brightness(copies["brightness"], factors),
        "contrast": adjust_contrast(copies["contrast"], factors),
        "saturation": adjust_saturation(copies["saturation"], factors),
        "hue": adjust_hue(images, hues),
        "blur": blur(images, sigmas, 7),
    }
    for b in range(5):
        f, h, s = factors[b].item(), hues[b].item(), sigmas[b].item()
        reference = {
            "brightness": TF.adjust_brightness(images[b], f),
            "contrast": TF.adjust_contrast(images[b], f),
            "saturation": TF.adjust_saturation(images[b], f),
            "hue": TF.adjust_hue(images[b], h),
            "blur": TF.gaussian_blur(images[b], [7, 7], [s, s]),
        }
        for name, expected in reference.items():
            torch.testing.assert_close(ours[name][b], expected, atol=1e-5, rtol=0, msg=name)
    # Brightness, contrast and saturation write into their input (the batched path passes its
    # own gathered rows); hue and blur return new tensors.
    assert all(ours[name] is copy for name, copy in copies.items())
    gray = images[:, :1]
    assert adjust_hue(gray, hues) is gray and adjust_saturation(gray, factors) is gray


@pytest.mark.parametrize(
    ("height", "width", "scale"), [(28, 28, (0.1, 0.4)), (28, 28, (0.4, 1.0)), (4, 64, (0.9, 1.0))]
)
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    torch.manual_seed(0)
    ours = sample_crop_boxes(N, height, width, scale).float()
    crop = v2.RandomResizedCrop(8, scale=scale)
    image = torch.zeros(1, height, width)
    reference = torch.tensor(
        [
            [p["top"], p["left"], p["height"], p["width"]]
            for p in (crop.make_params([image]) for _ in range(N))
        ]
    ).float()
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    area, reference_area = ours[:, 2] * ours[:, 3], reference[:, 2] * reference[:, 3]
    assert abs(area.mean() - reference_area.mean()) < 0.03 * reference_area.mean()
    torch.testing.assert_close(
        ours.mean(0), reference.mean(0), atol=0.03 * max(height, width), rtol=0
    )


def _per_view_fraction(crops, hit) -> list[float]:
    return [hit(pixels(view)).float().mean().item() for view in crops]


def test_blur_probability_per_view(monkeypatch):
    torch.manual_seed(0)
    marker = 0.25  # blurred rows come out constant
    monkeypatch.setattr(
        batched_module, "blur", lambda images, sigma, k: torch.full_like(images, marker)
    )
    transform = BatchedMultiCropTransform(16, 8, n_local_crops=2, **NO_PHOTOMETRIC)
    crops = transform(torch.randint(0, 256, (N, 1, 16, 16), dtype=torch.uint8))
    fractions = _per_view_fraction(crops, lambda x: (x - marker).abs().amax(dim=(1, 2, 3)) < 1e-4)
    assert fractions[0] == 1.0
    assert fractions[1] == pytest.approx(0.1, abs=0.03)
    assert fractions[2] == pytest.approx(0.5, abs=0.045) and fractions[3] == pytest.approx(
        0.5, abs=0.045
    )


def test_solarisation_only_on_global_views_after_the_first():
    torch.manual_seed(0)
    settings = {**NO_PHOTOMETRIC, "solarize_p": 0.2}
    transform = BatchedMultiCropTransform(16, 8, n_local_crops=2, n_global_crops=3, **settings)
    crops = transform(constant([200]))  # solarised: 255 - 200 = 55
    fractions = _per_view_fraction(crops, lambda x: x.mean(dim=(1, 2, 3)) < 0.5)
    assert fractions[0] == 0.0 and fractions[3] == 0.0 and fractions[4] == 0.0
    assert fractions[1] == pytest.approx(0.2, abs=0.04) and fractions[2] == pytest.approx(
        0.2, abs=0.04
    )


def test_flip_probability():
    torch.manual_seed(0)
    image = torch.zeros(N, 1, 16, 16, dtype=torch.uint8)
    image[..., 8:] = 255  # bright right half
    transform = BatchedMultiCropTransform(
        16,
        8,
        n_local_crops=1,
        blur_p=(0.0, 0.0, 0.0),
        **FULL_IMAGE,
        **{**NO_PHOTOMETRIC, "hflip_p": 0.5},
    )
    crops = transform(image)
    fractions = _per_view_fraction(
        crops, lambda x: x[..., 0].mean(dim=(1, 2)) > x[..., -1].mean(dim=(1, 2))
    )
    for fraction in fractions:
        assert fraction == pytest.approx(0.5, abs=0.045)


def test_colour_jitter_probability_and_factor_range():
    torch.manual_seed(0)
    settings = {**NO_PHOTOMETRIC, "color_jitter_p": 0.8, "color_jitter": (0.4, 0.0, 0.0, 0.0)}
    transform = BatchedMultiCropTransform(
        16, 8, n_local_crops=1, blur_p=(0.0, 0.0, 0.0), **settings
    )
    crops = transform(constant([100]))
    for view in crops:
        level = pixels(view).mean(dim=(1, 2, 3)) / (100 / 255)  # the brightness factor
        assert ((level - 1).abs() > 1e-4).float().mean().item() == pytest.approx(0.8, abs=0.04)
        assert level.min() >= 0.6 - 1e-4 and level.max() <= 1.4 + 1e-4


def test_grayscale_probability_on_colour_images():
    torch.manual_seed(0)
    settings = {**NO_PHOTOMETRIC, "grayscale_p": 0.2}
    transform = BatchedMultiCropTransform(
        16, 8, n_local_crops=1, blur_p=(0.0, 0.0, 0.0), **settings
    )
    crops = transform(constant([200, 50, 100], channels=3))
    for fraction in _per_view_fraction(
        crops, lambda x: (x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-4
    ):
        assert fraction == pytest.approx(0.2, abs=0.035)


@pytest.mark.parametrize("channels", [1, 3])
def test_per_view_pixel_statistics_match_the_per_sample_transform(channels):
    torch.manual_seed(0)
    images, _ = make_synthetic_images(768, image_size=32, seed=0)
    images = images[:, :channels]
    settings = {"global_crop_size": 24, "local_crop_size": 12, "n_local_crops": 2}
    per_sample = MultiCropTransform(**settings)
    reference = [
        torch.stack(views) for views in zip(*(per_sample(image) for image in images), strict=True)
    ]
    batched = BatchedMultiCropTransform(**settings)(images)
    for ours, theirs in zip(batched, reference, strict=True):
        ours, theirs = pixels(ours), pixels(theirs)
        assert ours.shape == theirs.shape
        assert ours.mean().item() == pytest.approx(theirs.mean().item(), abs=0.015)
        assert ours.std().item() == pytest.approx(theirs.std().item(), abs=0.015)
        # spatial smoothness (blur, resize): mean absolute difference of neighbouring pixels
        ours_tv = (ours[..., 1:] - ours[..., :-1]).abs().mean().item()
        theirs_tv = (theirs[..., 1:] - theirs[..., :-1]).abs().mean().item()
        assert ours_tv == pytest.approx(theirs_tv, rel=0.1)


def test_data_module_batched_batches_look_like_per_sample_batches():
    settings = {
        "dataset": "synthetic",
        "batch_size": 8,
        "num_workers": 0,
        "global_crop_size": 24,
        "local_crop_size": 12,
        "n_local_crops": 2,
        "synthetic_size": 32,
        "synthetic_image_size": 32,
    }
    batches = {}
    for augmentation in ("per_sample", "batched"):
        datamodule = MultiCropDataModule(**settings, augmentation=augmentation)
        datamodule.setup("fit")
        batches[augmentation] = next(iter(datamodule.train_dataloader()))
        crops, _ = datamodule.train_dataset[0]  # per-sample access keeps working
        assert len(crops) == 4
    (ours, labels), (theirs, their_labels) = batches["batched"], batches["per_sample"]
    assert [c.shape for c in ours] == [c.shape for c in theirs]
    assert [c.dtype for c in ours] == [c.dtype for c in theirs]
    assert labels.dtype == their_labels.dtype == torch.int64 and labels.shape == (8,)


def test_data_module_rejects_an_unknown_augmentation(tmp_path):
    with pytest.raises(ValueError, match=r"MultiCropDataModule\(augmentation=\.\.\.\) must be one of auto, per_sample, batched, device"):
        MultiCropDataModule(dataset="folder", data_dir=str(tmp_path), augmentation="gpu")


@pytest.mark.parametrize("grouped", [True, False], ids=["photo-sized", "small"])
def test_fixed_draws_give_the_pixels_of_torchvision_ops_applied_in_the_drawn_order(
    monkeypatch, grouped
):
    """Every per-pixel step with chosen parameters against torchvision, one crop at a time.

    Six crops, each with its own jitter order (one not jittered) and its own flip, grayscale,
    blur and solarisation choices: a wrong order decoding, a step applied to the wrong crops or
    with another crop's factor moves pixels by far more than the float tolerance. Both ways of
    running the jitter (grouped by order for large crops, by position for small ones).
    """
    monkeypatch.setattr(batched_module, "_GROUPED_MIN_PIXELS", 1 if grouped else 10**9)
    torch.manual_seed(0)
    transform = BatchedMultiCropTransform(20, 10, n_local_crops=0, n_global_crops=2)
    crops = torch.randint(0, 256, (2, 3, 3, 20, 20), dtype=torch.uint8)  # (V, B, C, S, S)
    orders = [[3, 2, 1, 0], [0, 1, 2, 3], None, [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 2, 1]]
    draws = {
        "jitter_code": torch.tensor(
            [-1 if o is None else o[0] * 64 + o[1] * 16 + o[2] * 4 + o[3] for o in orders]
        ),
        "factors": torch.tensor(
            [
                [0.7, 1.3, 1.1, 0.9, 1.2, 0.65],  # brightness
                [1.2, 0.8, 1.0, 1.35, 0.7, 1.1],  # contrast
                [0.9, 1.15, 1.0, 0.85, 1.2, 0.8],  # saturation
                [0.05, -0.08, 0.0, 0.1, -0.03, 0.07],  # hue
            ]
        ),
        "flip": torch.tensor([True, False, True, False, True, False]),
        "gray": torch.tensor([False, True, False, False, True, False]),
        "blur": torch.tensor([True, True, False, True, False, False]),
        "sigma": torch.tensor([0.5, 1.5, 1.0, 0.3, 1.0, 1.0]),
        "solarize": torch.tensor([False, False, True, True, False, False]),
    }
    monkeypatch.setattr(transform, "_draws", lambda *args: draws)
    views = transform._augment(crops, torch.zeros(2, 3), torch.zeros(2, 3))[0]
    kernel = batched_module.blur_kernel_size(20, 2.0)
    steps = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for row, order in enumerate(orders):
        x = crops.reshape(6, 3, 20, 20)[row].float() / 255
        for index in order or []:
            x = steps[index](x, draws["factors"][index, row].item())
        if draws["flip"][row]:
            x = TF.horizontal_flip(x)
        if draws["gray"][row]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if draws["blur"][row]:
            sigma = draws["sigma"][row].item()
            x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        if draws["solarize"][row]:
            x = TF.solarize(x, 128 / 255)
        expected = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        ours = views[row // 3][row % 3]
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0, msg=f"crop {row}")
