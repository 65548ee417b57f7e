"""The untransformed splits of each dataset the data module serves: train, k-NN train, k-NN val.

* ``synthetic``: ``synthetic_size`` generated images / the same images / another
  ``max(synthetic_size // 4, 1)`` images of the same classes.
* ``fashion_mnist`` and ``cifar10``: train / train / test.
* ``stl10``: train+unlabeled / train / test.
* ``folder``: ``data_dir/train`` and ``data_dir/val`` when they exist, else a fixed random
  ``val_fraction`` of the labelled images held out for k-NN val (:func:`hold_out`).
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset, Subset

from lightning_dino.data.builtin_datasets import (
    TensorImageDataset,
    load_fashion_mnist,
    make_synthetic_images,
    torchvision_dataset,
)
from lightning_dino.data.image_folders import ImageFolderDataset, hold_out

Splits = tuple[Dataset, Dataset | None, Dataset | None, list[str] | None]


def build_splits(hp: Any, decode_sizes: dict[str, int]) -> Splits:
    """The (train, k-NN train, k-NN val) datasets of ``(image, label)``, and a folder's classes.

    Args:
        hp: The data module's hyperparameters (``dataset``, ``data_dir``, ``synthetic_*``,
            ``skip_corrupt``, ``val_fraction``).
        decode_sizes: Reduced JPEG decoding of a folder (``min_pixels``, ``min_side``).

    Returns:
        ``(train, knn_train, knn_val, classes)``; the k-NN splits are None where there are no
        labels, ``classes`` None but for a folder.
    """
    if hp.dataset == "synthetic":
        train = _synthetic(hp, hp.synthetic_size, seed=0)
        return train, train, _synthetic(hp, max(hp.synthetic_size // 4, 1), seed=1), None
    if hp.dataset == "fashion_mnist":
        train = TensorImageDataset(*load_fashion_mnist(hp.data_dir, train=True))
        test = TensorImageDataset(*load_fashion_mnist(hp.data_dir, train=False))
        return train, train, test, None
    if hp.dataset == "cifar10":
        train = torchvision_dataset("cifar10", hp.data_dir, "train")
        return train, train, torchvision_dataset("cifar10", hp.data_dir, "test"), None
    if hp.dataset == "stl10":
        return (
            torchvision_dataset("stl10", hp.data_dir, "train+unlabeled"),
            torchvision_dataset("stl10", hp.data_dir, "train"),
            torchvision_dataset("stl10", hp.data_dir, "test"),
            None,
        )
    return _folder_splits(hp, decode_sizes)


def _synthetic(hp: Any, size: int, seed: int) -> TensorImageDataset:
    images, labels = make_synthetic_images(
        size, hp.synthetic_image_size, hp.synthetic_num_classes, seed
    )
    return TensorImageDataset(images, labels)


def _folder_splits(hp: Any, sizes: dict[str, int]) -> Splits:
    """Splits of an image folder: ``train/`` and ``val/`` subfolders, or a hold-out."""
    root, skip = hp.data_dir, hp.skip_corrupt
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    has_split_dirs = os.path.isdir(train_dir)
    data = ImageFolderDataset(train_dir if has_split_dirs else root, skip_corrupt=skip, **sizes)
    labelled = [i for i, label in enumerate(data.labels) if label >= 0]
    if not labelled:
        return data, None, None, data.classes
    if has_split_dirs and os.path.isdir(val_dir):
        classes = data.class_to_idx
        val = ImageFolderDataset(val_dir, skip_corrupt=skip, class_to_idx=classes, **sizes)
        val_labelled = [i for i, label in enumerate(val.labels) if label >= 0]
        knn_val = Subset(val, val_labelled) if val_labelled else None
        return data, Subset(data, labelled), knn_val, data.classes
    held_out = set(hold_out(labelled, hp.val_fraction))
    train = Subset(data, [i for i in range(len(data)) if i not in held_out])
    knn_train = Subset(data, [i for i in labelled if i not in held_out])
    knn_val = Subset(data, sorted(held_out)) if held_out else None
    return train, knn_train, knn_val, data.classes
