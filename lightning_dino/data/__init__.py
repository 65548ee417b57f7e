"""Data for DINO: crop settings, multi-crop augmentation, datasets and the Lightning data module."""

from lightning_dino.data.batched import BatchedMultiCropTransform
from lightning_dino.data.builtin_datasets import (
    TensorImageDataset,
    TransformDataset,
    load_fashion_mnist,
    make_synthetic_images,
    torchvision_dataset,
)
from lightning_dino.data.crops import CropSettings
from lightning_dino.data.datamodule import MultiCropDataModule
from lightning_dino.data.image_folders import (
    IMG_EXTENSIONS,
    UNLABELED,
    ImageFolderDataset,
    load_image,
)
from lightning_dino.data.prepared.streaming import PreparedDataset, StreamingImages, decode_image
from lightning_dino.data.transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
)

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "UNLABELED",
    "BatchedMultiCropTransform",
    "CropSettings",
    "EvalTransform",
    "ImageFolderDataset",
    "MultiCropDataModule",
    "MultiCropTransform",
    "PreparedDataset",
    "StreamingImages",
    "TensorImageDataset",
    "TransformDataset",
    "decode_image",
    "load_fashion_mnist",
    "load_image",
    "make_synthetic_images",
    "torchvision_dataset",
]
