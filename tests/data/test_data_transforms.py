import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lightning_dino.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    blur_kernel_size,
    to_rgb_uint8_tensor,
    to_uint8_tensor,
)

SMALL = {"global_crop_size": 24, "local_crop_size": 12, "n_local_crops": 3}
NO_PHOTOMETRIC = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "hflip_p": 0.0}


def random_uint8(*shape, seed=0):
    return torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def steps_of(pipeline, kind):
    """Transforms of type ``kind`` in a view pipeline, unwrapping RandomApply as (op, p)."""
    found = []
    for step in pipeline.transforms:
        if isinstance(step, v2.RandomApply) and isinstance(step.transforms[0], kind):
            found.append((step.transforms[0], step.p))
        elif isinstance(step, kind):
            found.append((step, step.p))
    return found


def test_output_structure_and_normalised_range():
    transform = MultiCropTransform(**SMALL)
    crops = transform(random_uint8(3, 40, 30))
    assert transform.n_crops == 5 and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for crop in crops:
        assert crop.dtype == torch.float32 and crop.is_contiguous()
        assert torch.isfinite(crop).all()
        pixels = crop * std + mean  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_default_sizes_match_the_reference():
    crops = MultiCropTransform()(random_uint8(3, 64, 48))
    assert len(crops) == 10
    assert [c.shape[-1] for c in crops] == [224, 224] + [96] * 8


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK", "RGB", "I;16", "I", "F"])
def test_pil_modes_give_three_channels(mode):
    image = Image.fromarray(random_uint8(20, 16, 3).numpy()).convert(
        mode if mode != "I;16" else "L"
    )
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    crops = MultiCropTransform(**SMALL)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert tuple(EvalTransform(16)(image).shape) == (3, 16, 16)


@pytest.mark.parametrize("shape", [(20, 16), (1, 20, 16), (3, 20, 16)])
def test_uint8_tensor_inputs(shape):
    crops = MultiCropTransform(**SMALL)(random_uint8(*shape))
    assert all(c.shape[0] == 3 for c in crops)


def test_grayscale_is_replicated_to_identical_channels():
    gray = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    for crop in MultiCropTransform(**SMALL, **gray)(random_uint8(1, 20, 16)):
        assert torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])
    image = EvalTransform(16, **gray)(Image.fromarray(random_uint8(20, 16).numpy()))
    assert torch.equal(image[0], image[2])


def test_rejects_bad_tensors():
    transform = MultiCropTransform(**SMALL)
    with pytest.raises(TypeError, match="uint8"):
        transform(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(4, 8, 8\)"):
        transform(random_uint8(4, 8, 8))
    with pytest.raises(TypeError, match="ndarray"):
        transform(np.zeros((8, 8), dtype=np.uint8))


def test_images_smaller_than_the_crops_are_upsampled():
    crops = MultiCropTransform(**SMALL)(Image.fromarray(random_uint8(5, 7, 3).numpy()))
    assert [c.shape[-1] for c in crops] == [24, 24, 12, 12, 12]
    assert tuple(EvalTransform(16)(random_uint8(3, 5, 7)).shape) == (3, 16, 16)


def test_sixteen_bit_is_scaled_not_clipped():
    levels = np.array([[0, 257 * 100, 65535, 1000, 128, 129]], dtype=np.uint16)
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    expected = torch.tensor([[[0, 100, 255, 4, 0, 1]]], dtype=torch.uint8)
    assert torch.equal(to_uint8_tensor(image), expected)
    assert torch.equal(to_rgb_uint8_tensor(image), expected.expand(3, -1, -1))
    big_endian = Image.frombytes("I;16B", (6, 1), levels.astype(">u2").tobytes())
    assert torch.equal(to_uint8_tensor(big_endian), expected)


def test_palette_and_alpha_conversions():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_uint8_tensor(rgba)[:, 0, 0].tolist() == [10, 20, 30]
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = 0
    assert to_uint8_tensor(palette).shape == (3, 4, 4)


def test_view_pipelines_carry_the_reference_probabilities():
    transform = MultiCropTransform()
    first, second = transform.global_transforms
    local = transform.local_transform
    for pipeline, blur_p in ((first, 1.0), (second, 0.1), (local, 0.5)):
        ((blur, p),) = steps_of(pipeline, v2.GaussianBlur)
        assert p == blur_p
        assert blur.kernel_size == (13, 13) and blur.sigma == [0.1, 2.0]
        crop = pipeline.transforms[0]
        assert isinstance(crop, v2.RandomResizedCrop)
        assert crop.interpolation == v2.InterpolationMode.BICUBIC and crop.antialias
        assert [p for _, p in steps_of(pipeline, v2.ColorJitter)] == [0.8]
        assert [p for _, p in steps_of(pipeline, v2.RandomGrayscale)] == [0.2]
        assert [p for _, p in steps_of(pipeline, v2.RandomHorizontalFlip)] == [0.5]
    assert steps_of(first, v2.RandomSolarize) == steps_of(local, v2.RandomSolarize) == []
    ((solarize, p),) = steps_of(second, v2.RandomSolarize)
    assert p == 0.2 and solarize.threshold == 128


def view_frequency(pipeline, image, predicate, draws):
    """Fraction of ``draws`` calls of a view pipeline whose output satisfies ``predicate``."""
    return sum(bool(predicate(pipeline(image))) for _ in range(draws)) / draws


def test_solarisation_frequency_per_view():
    # A constant image stays constant through crops and blur; solarising maps 200 -> 55.
    transform = MultiCropTransform(
        global_crop_size=8, local_crop_size=8, mean=(0, 0, 0), std=(1, 1, 1), **NO_PHOTOMETRIC
    )
    image = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    first, second = transform.global_transforms

    def solarised(crop):
        return crop.mean() < 0.5

    torch.manual_seed(0)
    assert view_frequency(first, image, solarised, 200) == 0.0
    assert view_frequency(transform.local_transform, image, solarised, 200) == 0.0
    assert abs(view_frequency(second, image, solarised, 400) - 0.2) < 0.06


def test_blur_frequency_per_view():
    # Full-image crops of noise: blurring with sigma >= 1 removes most pixel-to-pixel variation.
    transform = MultiCropTransform(
        global_crop_size=16,
        local_crop_size=16,
        global_crop_scale=(1.0, 1.0),
        local_crop_scale=(1.0, 1.0),
        blur_sigma=(1.0, 2.0),
        solarize_p=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        **NO_PHOTOMETRIC,
    )
    image = random_uint8(3, 16, 16)
    unblurred = (image.float() / 255).diff(dim=-1).abs().mean()
    first, second = transform.global_transforms

    def blurred(crop):
        return crop.diff(dim=-1).abs().mean() < unblurred / 2

    torch.manual_seed(0)
    assert view_frequency(first, image, blurred, 100) == 1.0
    assert abs(view_frequency(second, image, blurred, 300) - 0.1) < 0.05
    assert abs(view_frequency(transform.local_transform, image, blurred, 300) - 0.5) < 0.09


def test_extra_global_crops_follow_the_second_view():
    transform = MultiCropTransform(**SMALL, n_global_crops=3)
    assert len(transform(random_uint8(3, 20, 20))) == 6
    blur_p = [steps_of(t, v2.GaussianBlur)[0][1] for t in transform.global_transforms]
    assert blur_p == [1.0, 0.1, 0.1]


def test_transform_pickles_for_worker_processes():
    transform = pickle.loads(pickle.dumps(MultiCropTransform(**SMALL)))
    assert len(transform(random_uint8(3, 20, 20))) == 5
    evaluation = pickle.loads(pickle.dumps(EvalTransform(16)))
    assert evaluation(random_uint8(3, 20, 20)).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"global_crop_size": 0}, "global_crop_size"),
        ({"n_local_crops": -1}, "n_local_crops"),
        ({"n_global_crops": 0}, "n_global_crops"),
        ({"global_crop_scale": (0.5, 0.4)}, "global_crop_scale"),
        ({"local_crop_scale": (0.0, 0.4)}, "local_crop_scale"),
        ({"hflip_p": 1.5}, "hflip_p"),
        ({"blur_p": (1.0, 0.1)}, "blur_p"),
        ({"blur_p": (1.0, 0.1, -0.1)}, "blur_p"),
        ({"blur_sigma": (0.0, 2.0)}, "blur_sigma"),
        ({"color_jitter": (0.4, 0.4, 0.2, 0.6)}, "color_jitter"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5,)}, "mean"),
    ],
)
def test_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        MultiCropTransform(**kwargs)


def test_zero_local_crops_and_no_photometric_ops():
    transform = MultiCropTransform(**{**SMALL, "n_local_crops": 0}, color_jitter=(0, 0, 0, 0))
    assert len(transform(random_uint8(3, 20, 20))) == 2
    assert steps_of(transform.global_transforms[0], v2.ColorJitter) == []


def test_blur_kernel_size():
    assert blur_kernel_size(224, 2.0) == 13
    assert blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(8, 2.0) == 7
    assert blur_kernel_size(5, 0.1) == 3
    assert blur_kernel_size(1, 2.0) == 1
    tiny = MultiCropTransform(global_crop_size=4, local_crop_size=2, n_local_crops=1)
    assert [c.shape[-1] for c in tiny(random_uint8(3, 6, 6))] == [4, 4, 2]


def test_eval_transform_is_deterministic_with_the_reference_ratio():
    transform = EvalTransform(32)
    assert transform.resize == 37  # round(32 / 0.875)
    assert EvalTransform(224).resize == 256
    image = random_uint8(3, 50, 40)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(image))
    assert EvalTransform(16, resize=16)(image).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="resize must be >= size"):
        EvalTransform(16, resize=15)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_separable_blur_equals_torchvision_gaussian_blur(dtype):
    from lightning_dino.data.blur import SeparableGaussianBlur

    image = random_uint8(3, 40, 33)
    image = image if dtype == torch.uint8 else image.float() / 255
    ours, theirs = SeparableGaussianBlur(13, (0.1, 2.0)), v2.GaussianBlur(13, (0.1, 2.0))
    for seed in range(5):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)  # the same sigma draw
        want = theirs(image)
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.uint8:
            # Rounding to uint8: a value within float error of .5 may round the other way.
            assert (got.int() - want.int()).abs().max() <= 1
            assert (got != want).float().mean() < 0.01
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fast_colour_jitter_equals_torchvision_colour_jitter():
    from lightning_dino.data.color import FastColorJitter

    image = random_uint8(3, 24, 30)
    ours, theirs = FastColorJitter(0.4, 0.4, 0.2, 0.1), v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    for seed in range(20):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)  # the same order and factors
        want = theirs(image)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        # The hue step's float results differ by rounding only; uint8 conversion may flip a level.
        assert (got.int() - want.int()).abs().max() <= 1, seed
        assert (got != want).float().mean() < 0.02, seed
    gray = random_uint8(1, 8, 8)
    torch.manual_seed(0)
    assert ours(gray).shape == (1, 8, 8)
