"""Crop sizes that change from step to step: DINOv3's high-resolution adaptation.

DINOv3 adapts a trained model to large images with a short phase in which every step draws one
(global, local, Gram) crop-size triple with fixed probabilities, the same on every GPU
(``dinov3_vit7b16_high_res_adapt.yaml``: (512, 112, 768) 0.3, (768, 112, 1152) 0.3,
(768, 168, 1152) 0.3, (768, 224, 1152) 0.05, (768, 336, 1152) 0.05; ``dinov3/train/train.py``
builds a loader per triple and ``dinov3/data/meta_loaders.py`` picks one per step from a
generator seeded alike on every rank). Here the choice of a step is a pure function of the run's
seed, the epoch and the batch's position in it (:meth:`CropSizeMix.choice`): every rank draws
the same, and a resumed run draws again what the uninterrupted run drew. The sampler tags each
index with its batch's choice (:class:`TaggedDataset` turns the tag into the transform).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_dino.data.batched import collate_images
from lightning_dino.data.crops import CropSettings
from lightning_dino.setting_names import setting


class CropSizeMix:
    """Crop-size triples and the probability of each, drawn once per step.

    Args:
        triples: ``[global, local, gram, probability]`` rows (``gram`` 0 without Gram crops);
            the probabilities must sum to 1.
        crops: The other crop settings, shared by every triple.

    Raises:
        ValueError: For a malformed row or probabilities that do not sum to 1, naming
            ``--data.crop_size_mix``.

    Examples:
        >>> mix = CropSizeMix([[32, 16, 0, 0.5], [48, 16, 0, 0.5]], CropSettings())
        >>> [variant.global_crop_size for variant in mix.variants]
        [32, 48]
    """

    def __init__(self, triples: Sequence[Sequence[float]], crops: CropSettings) -> None:
        rows = [list(row) for row in triples]
        good = bool(rows) and all(
            len(row) == 4 and all(float(v).is_integer() and v >= 0 for v in row[:3])
            and row[0] > 0 and row[1] > 0 and 0 < row[3] <= 1 for row in rows
        )
        if not good or abs(sum(row[3] for row in rows) - 1.0) > 1e-6:
            raise ValueError(
                f"{setting('data', 'crop_size_mix', rows)} is invalid: give rows "
                "[global_size, local_size, gram_size (0: none), probability] with positive sizes "
                "and probabilities summing to 1, e.g. [[512, 112, 768, 0.5], [768, 168, 1152, 0.5]]"
            )
        self.probabilities = torch.tensor([float(row[3]) for row in rows], dtype=torch.float64)
        self.variants = [
            dataclasses.replace(
                crops, global_crop_size=int(g), local_crop_size=int(lo), gram_crop_size=int(gr)
            )
            for g, lo, gr, _ in rows
        ]

    def choice(self, seed: int, epoch: int, batch: int) -> int:
        """The triple of the ``batch``-th step of ``epoch``: the same on every rank and resume.

        Args:
            seed: The run's seed (``seed_everything``).
            epoch: Zero-based epoch.
            batch: The batch's position in the epoch (steps since the epoch began).

        Returns:
            Index into :attr:`variants`.
        """
        generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + epoch * 1_009 + batch) % (2**63 - 1)
        )
        return int(torch.multinomial(self.probabilities, 1, generator=generator))

    def sizes(self) -> dict[str, list[int]]:
        """Every global, local and Gram size the mix uses (for checks and the checkpoint)."""
        return {
            "global": sorted({v.global_crop_size for v in self.variants}),
            "local": sorted({v.local_crop_size for v in self.variants}),
            "gram": sorted({v.gram_crop_size for v in self.variants if v.gram_crop_size}),
        }


class TaggedDataset(Dataset):
    """``(image, label)`` samples transformed by the transform their batch's tag picks.

    The sampler yields ``(index, tag)`` pairs (an :class:`~lightning_dino.data.sampler.EpochSampler`
    with a ``tag``); ``transforms[tag]`` transforms the image (one transform serves every tag:
    decoding, when the collate makes the crops). Untagged indices use the first.

    Args:
        dataset: Dataset yielding ``(image, label)``.
        transforms: One transform per tag.
        keep_tag: Return ``(image, label, tag)``: for loaders whose collate makes the crops.
    """

    def __init__(
        self, dataset: Dataset, transforms: Sequence[Callable[[Any], Any]], keep_tag: bool = False
    ) -> None:
        self.dataset = dataset
        self.transforms = list(transforms)
        self.keep_tag = keep_tag

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, ...]:
        """``(transforms[tag](image), label)``, with the tag when ``keep_tag``."""
        index, tag = item if isinstance(item, tuple) else (item, 0)
        image, label = self.dataset[index]
        out = self.transforms[tag if len(self.transforms) > 1 else 0](image)
        return (out, int(label), tag) if self.keep_tag else (out, int(label))


class MixedCollate:
    """DataLoader ``collate_fn`` of batched augmentation under a size mix: the batch's transform.

    Args:
        transforms: The batch-wise transform of each crop-size variant.
    """

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, samples: Sequence[tuple[Any, ...]]) -> Any:
        """Augment ``(image, label[, tag])`` samples with the transform of their tag."""
        tag = samples[0][2] if len(samples[0]) == 3 else 0
        return self.transforms[tag].collate([(image, label) for image, label, *_ in samples])


def collate_tagged_images(samples: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """DataLoader ``collate_fn`` of device augmentation: decoded images, labels, the tag.

    Returns:
        ``(images, labels)``, or ``(images, labels, tag)`` for tagged samples (a size mix).
    """
    images, labels = collate_images([(image, label) for image, label, *_ in samples])
    if len(samples[0]) == 3:
        return images, labels, torch.tensor(samples[0][2])
    return images, labels
