"""The built-in datasets: in-memory tensors, transforms over a dataset, synthetic images, torchvision's."""


import pytest
import torch

from lightning_dino.data.builtin_datasets import (
    TensorImageDataset,
    TransformDataset,
    make_synthetic_images,
    torchvision_dataset,
)
from lightning_dino.data.image_folders import UNLABELED


def test_tensor_image_dataset():
    images = torch.arange(2 * 4 * 5, dtype=torch.uint8).view(2, 4, 5)
    dataset = TensorImageDataset(images)
    image, label = dataset[1]
    assert len(dataset) == 2 and image.shape == (1, 4, 5) and label == UNLABELED
    assert torch.equal(image[0], images[1])
    labelled = TensorImageDataset(
        images.view(2, 1, 4, 5), torch.tensor([3, 7]), transform=lambda x: x.sum()
    )
    assert labelled[1] == (images[1].sum(), 7)
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(images.float())
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        TensorImageDataset(torch.zeros(2, 2, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        TensorImageDataset(images, torch.tensor([1]))


def test_transform_dataset_applies_the_transform():
    base = TensorImageDataset(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    dataset = TransformDataset(base, lambda image: image.shape)
    assert len(dataset) == 3 and dataset[2] == ((1, 4, 4), 2)


def test_synthetic_images_are_deterministic_balanced_and_learnable():
    images, labels = make_synthetic_images(200, image_size=16, num_classes=10)
    again, _ = make_synthetic_images(200, image_size=16, num_classes=10)
    assert images.shape == (200, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(images, again)
    assert torch.bincount(labels).tolist() == [20] * 10
    held_out, held_out_labels = make_synthetic_images(100, image_size=16, num_classes=10, seed=1)
    assert not torch.equal(held_out, images[:100])
    # Nearest class mean on raw pixels already separates the classes of another seed.
    means = torch.stack([images[labels == c].float().mean(0) for c in range(10)]).flatten(1)
    distances = torch.cdist(held_out.float().flatten(1), means)
    accuracy = (distances.argmin(1) == held_out_labels).float().mean()
    assert accuracy > 0.5  # chance is 0.1


def test_missing_torchvision_datasets_say_how_to_fix(tmp_path):
    for name, split in (("cifar10", "train"), ("stl10", "train+unlabeled"), ("stl10", "test")):
        with pytest.raises(FileNotFoundError, match=rf"{name}.*{tmp_path}.*MultiCropDataModule\(download=True\)"):
            torchvision_dataset(name, str(tmp_path), split)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown"):
        torchvision_dataset("cifar10", str(tmp_path), "unlabeled")
