"""LightningDataModule serving DINO multi-crop batches and k-NN evaluation batches."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_dino.data.batched import BatchedMultiCropTransform, collate_views, with_labels
from lightning_dino.data.builtin_datasets import (
    TransformDataset,
    load_fashion_mnist,
    torchvision_dataset,
)
from lightning_dino.data.crops import CROP_SETTINGS, DEFAULT_CROPS, crop_settings
from lightning_dino.data.image_folders import SPLIT_SEED
from lightning_dino.data.prepared.streaming import (
    PreparedDataset,
    prepare_command,
    streaming_loader,
)
from lightning_dino.data.sampler import EpochSampler, ResumableDataLoader, available_cpus
from lightning_dino.data.size_mix import (
    CropSizeMix,
    MixedCollate,
    TaggedDataset,
    collate_tagged_images,
)
from lightning_dino.data.splits import build_splits
from lightning_dino.data.transforms import (
    EvalTransform,
    MultiCropTransform,
    min_decode_pixels,
    to_uint8_tensor,
)
from lightning_dino.setting_names import setting

DatasetName = Literal["folder", "streaming", "fashion_mnist", "cifar10", "stl10", "synthetic"]

_MAX_DEFAULT_WORKERS = 8
_NEEDS_DATA_DIR = ("folder", "streaming", "cifar10", "stl10")
_DATA_DIR_KIND = {
    "folder": "image folder",
    "streaming": "directory or URL written by `lightning-dino prepare`",
}
_DOWNLOADABLE = ("fashion_mnist", "cifar10", "stl10")
_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "stl10": 10}
_AUGMENTATIONS = ("auto", "per_sample", "batched", "device")


class MultiCropDataModule(pl.LightningDataModule):
    """Multi-crop training data and labelled k-NN evaluation data for DINO.

    ``train_dataloader()`` yields ``(crops, labels)``: ``crops`` is a crop-major list
    ``[g1, g2, l1, ..., lN]`` of float32 tensors (batch_size, 3, H, W) (H = W =
    ``global_crop_size`` for global crops, ``local_crop_size`` for local ones) and
    ``labels`` is int64 (batch_size,), -1 where the data has no labels. It shuffles and
    drops the last incomplete batch. ``knn_train_dataloader()`` and ``knn_val_dataloader()``
    yield ``(images, labels)`` of shapes (B, 3, eval_size, eval_size) and (B,) with the
    evaluation transform, in a fixed order, keeping every sample.

    Splits (train / k-NN train / k-NN val):

    * ``synthetic``: ``synthetic_size`` generated images / the same images / another
      ``max(synthetic_size // 4, 1)`` images of the same classes.
    * ``fashion_mnist`` and ``cifar10``: train / train / test.
    * ``stl10``: train+unlabeled (105,000 images, 100,000 with label -1) / train / test.
    * ``folder``: the image tree is ``data_dir/train`` if that exists, else ``data_dir``.
      With a ``data_dir/val`` next to ``train``, the splits are train / labelled train /
      labelled val (ImageNet's layout). Otherwise a fixed random ``val_fraction`` of the
      labelled images is held out for k-NN val, and the rest (with any unlabeled images)
      is used for training and k-NN train. A folder without class subfolders has no k-NN
      data.
    * ``streaming``: a folder prepared once by ``lightning-dino prepare`` (see
      :mod:`lightning_dino.data.prepared.streaming`), streamed with LitData: its ``train``
      split / the labelled images of ``train`` / its ``val`` split, which ``prepare`` made
      like ``folder`` makes its splits (its ``--val_fraction``; ``--data.val_fraction`` does
      not apply).
      LitData shuffles and shards the training images over processes and workers, and the
      loader's position is saved in checkpoints, so a resumed run continues mid-epoch.

    Args:
        dataset: Which data to use.
        data_dir: Image folder (``folder``), prepared directory or URL such as
            ``s3://bucket/dir`` (``streaming``), torchvision root (``cifar10``, ``stl10``) or
            idx directory (``fashion_mnist``; also searches ``data_dir/FashionMNIST/raw``
            and ``/usr/share/datasets/fashion-mnist``). Unused by ``synthetic``.
        batch_size: Training images per device (each gives ``n_crops`` crops).
        num_workers: DataLoader worker processes per device; None picks
            ``min(available CPUs // devices, 8)``; 0 loads in the main process.
        pin_memory: Pin host memory for faster GPU copies; None pins when CUDA is available.
        download: Download ``fashion_mnist``, ``cifar10`` or ``stl10`` into ``data_dir`` if
            missing.
        global_crop_size: The crop settings, ``global_crop_size`` to ``std``: see
            :class:`~lightning_dino.data.crops.CropSettings` for each one and its default (the
            reference's). ``mean`` and ``std`` are ImageNet's by default; Fashion-MNIST configs
            pass (0.286, 0.286, 0.286) and (0.353, 0.353, 0.353).
        local_crop_size: See ``CropSettings``.
        n_local_crops: See ``CropSettings``.
        global_crop_scale: See ``CropSettings``.
        local_crop_scale: See ``CropSettings``.
        n_global_crops: See ``CropSettings``.
        hflip_p: See ``CropSettings``.
        color_jitter: See ``CropSettings``.
        color_jitter_p: See ``CropSettings``.
        grayscale_p: See ``CropSettings``.
        blur_p: See ``CropSettings``.
        blur_sigma: See ``CropSettings``.
        solarize_p: See ``CropSettings``.
        mean: See ``CropSettings``.
        std: See ``CropSettings``.
        gram_crop_size: 0, or the side of the Gram teacher's crops (see ``CropSettings``): the
            batches are then dicts ``{"crops", "gram_crops", "labels"}``.
        crop_size_mix: DINOv3's high-resolution adaptation: rows ``[global_crop_size,
            local_crop_size, gram_crop_size, probability]``; each step draws one row, the same
            on every device and again on resume (:mod:`~lightning_dino.data.size_mix`). The three
            size arguments above are then unused. Not with ``streaming``.
        eval_size: Side of k-NN images; None uses ``global_crop_size``.
        eval_resize: Shorter side before the k-NN center crop; None uses
            ``round(eval_size / 0.875)``; equal to ``eval_size`` to skip cropping.
        eval_batch_size: Batch size of the k-NN loaders; None uses ``batch_size``.
        skip_corrupt: Skip unreadable image files with a warning instead of raising.
        val_fraction: Fraction of a ``folder`` dataset's labelled images held out for
            k-NN val when it has no ``val/`` subfolder; 0 disables k-NN val.
        subset: Use at most this many images of each split (a fixed random draw), for
            quick runs; None uses everything.
        synthetic_size: Number of ``synthetic`` training images.
        synthetic_image_size: Side of ``synthetic`` images, in pixels.
        synthetic_num_classes: Number of ``synthetic`` classes.
        augmentation: Where the multi-crop augmentation runs (same distributions everywhere).
            ``"per_sample"``: :class:`MultiCropTransform` on each image in the workers
            (1.3x the original DINO pipeline per core on ImageNet-sized photos).
            ``"batched"``: the workers decode and cut each image's crops, then augment the
            whole batch's pixels at once with :class:`BatchedMultiCropTransform` (no uint8
            rounding between the pixel steps; 1.7-2.4x the original per core on photos,
            depending on the machine: see the speed benchmarks).
            ``"device"``: the workers only decode (13-19x the original per core); crops and
            pixel work run on the training device after the transfer
            (``on_after_batch_transfer``), batched; for GPUs, where the CPU would otherwise
            starve the accelerator.
            ``"auto"`` (default): ``device`` when training on a GPU, else ``batched``.
        cache_dir: Where LitData caches the chunks of a remote ``streaming`` dataset; None
            uses LitData's default. Local datasets are read in place.

    Raises:
        ValueError: If an argument is invalid; the message names it
            (:func:`~lightning_dino.setting_names.setting`).

    Examples:
        >>> data = MultiCropDataModule(dataset="synthetic", synthetic_size=8,
        ...                            synthetic_image_size=32, global_crop_size=32,
        ...                            local_crop_size=16, batch_size=4, num_workers=0)
        >>> data.setup("fit")
        >>> crops, labels = next(iter(data.train_dataloader()))
        >>> len(crops), tuple(crops[0].shape), tuple(crops[-1].shape)
        (10, (4, 3, 32, 32), (4, 3, 16, 16))
    """

    def __init__(
        self,
        dataset: DatasetName = "synthetic",
        data_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        download: bool = False,
        global_crop_size: int = DEFAULT_CROPS.global_crop_size,
        local_crop_size: int = DEFAULT_CROPS.local_crop_size,
        n_local_crops: int = DEFAULT_CROPS.n_local_crops,
        global_crop_scale: tuple[float, float] = DEFAULT_CROPS.global_crop_scale,
        local_crop_scale: tuple[float, float] = DEFAULT_CROPS.local_crop_scale,
        n_global_crops: int = DEFAULT_CROPS.n_global_crops,
        hflip_p: float = DEFAULT_CROPS.hflip_p,
        color_jitter: tuple[float, float, float, float] = DEFAULT_CROPS.color_jitter,
        color_jitter_p: float = DEFAULT_CROPS.color_jitter_p,
        grayscale_p: float = DEFAULT_CROPS.grayscale_p,
        blur_p: tuple[float, float, float] = DEFAULT_CROPS.blur_p,
        blur_sigma: tuple[float, float] = DEFAULT_CROPS.blur_sigma,
        solarize_p: float = DEFAULT_CROPS.solarize_p,
        mean: tuple[float, float, float] = DEFAULT_CROPS.mean,
        std: tuple[float, float, float] = DEFAULT_CROPS.std,
        gram_crop_size: int = DEFAULT_CROPS.gram_crop_size,
        crop_size_mix: list[list[float]] | None = None,
        eval_size: int | None = None,
        eval_resize: int | None = None,
        eval_batch_size: int | None = None,
        skip_corrupt: bool = True,
        val_fraction: float = 0.1,
        subset: int | None = None,
        synthetic_size: int = 512,
        synthetic_image_size: int = 32,
        synthetic_num_classes: int = 10,
        augmentation: Literal["auto", "per_sample", "batched", "device"] = "auto",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
        try:
            self.crops = crop_settings(**{key: self.hparams[key] for key in CROP_SETTINGS})
        except ValueError as err:  # messages start with the argument's name
            name, problem = str(err).split(" ", 1)
            raise ValueError(f"{setting('data', name)} {problem}") from err
        self.size_mix = None if crop_size_mix is None else CropSizeMix(crop_size_mix, self.crops)
        self.crop_variants = self.size_mix.variants if self.size_mix else [self.crops]
        self.train_transform = MultiCropTransform(self.crop_variants[0])
        self.eval_transform = EvalTransform(
            eval_size or self.crop_variants[0].global_crop_size, eval_resize, mean=mean, std=std
        )
        self.batched_transform = (
            BatchedMultiCropTransform(self.crop_variants[0])
            if augmentation != "per_sample"
            else None
        )
        self.train_dataset: Dataset | None = None
        self._train_images: Dataset | None = None
        self._train_sampler: EpochSampler | None = None  # kept so each loader moves an epoch on
        self.knn_train_dataset: Dataset | None = None
        self.knn_val_dataset: Dataset | None = None
        self._folder_classes: list[str] | None = None
        self._train_size: int | None = None  # streaming: the train split's image count

    def _check_arguments(self) -> None:
        """Validate the arguments that the transforms do not check."""
        hp = self.hparams
        if hp.dataset not in get_args(DatasetName):
            raise ValueError(
                f"{setting('data', 'dataset')} must be one of {get_args(DatasetName)}, got "
                f"{hp.dataset!r}"
            )
        if hp.augmentation not in _AUGMENTATIONS:
            raise ValueError(
                f"{setting('data', 'augmentation')} must be one of {', '.join(_AUGMENTATIONS)}, "
                "got "
                f"{hp.augmentation!r}"
            )
        for key, minimum in [
            ("batch_size", 1),
            ("num_workers", 0),
            ("eval_size", 1),
            ("eval_batch_size", 1),
            ("subset", 1),
            ("synthetic_size", 1),
            ("synthetic_image_size", 1),
            ("synthetic_num_classes", 1),
        ]:
            if hp[key] is not None and hp[key] < minimum:
                raise ValueError(f"{setting('data', key)} must be >= {minimum}, got {hp[key]}")
        eval_size = hp.eval_size or hp.global_crop_size
        if hp.eval_resize is not None and hp.eval_resize < eval_size:
            raise ValueError(
                f"{setting('data', 'eval_resize', hp.eval_resize)} must be >= the k-NN image "
                f"size ({eval_size}, {setting('data', 'eval_size')} or "
                f"{setting('data', 'global_crop_size')})"
            )
        if not 0.0 <= hp.val_fraction < 1.0:
            raise ValueError(
                f"{setting('data', 'val_fraction')} must be in [0, 1), got {hp.val_fraction}"
            )
        if hp.dataset in _NEEDS_DATA_DIR and hp.data_dir is None:
            raise ValueError(
                f"{setting('data', 'data_dir')} is required for "
                f"{setting('data', 'dataset', hp.dataset)}: set it to the "
                f"{_DATA_DIR_KIND.get(hp.dataset, 'torchvision root')}"
            )
        if hp.dataset == "streaming" and hp.subset is not None:
            raise ValueError(
                f"{setting('data', 'subset')} does not apply to "
                f"{setting('data', 'dataset', 'streaming')}; prepare a smaller folder instead "
                f"({prepare_command('SMALLER_FOLDER')})"
            )
        if hp.dataset == "streaming" and hp.crop_size_mix:
            raise ValueError(
                f"{setting('data', 'crop_size_mix')} does not apply to "
                f"{setting('data', 'dataset', 'streaming')} (LitData's loader draws the batches); "
                f"use {setting('data', 'dataset', 'folder')} for the high-resolution phase"
            )
        if hp.download and hp.dataset not in _DOWNLOADABLE:
            raise ValueError(
                f"{setting('data', 'download')} applies to {', '.join(_DOWNLOADABLE)}, not to "
                f"{setting('data', 'dataset', hp.dataset)}; remove it"
            )

    @property
    def n_crops(self) -> int:
        """Crops per training image: ``n_global_crops + n_local_crops``."""
        return self.train_transform.n_crops

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for unlabeled data (a flat ``folder``).

        Raises:
            RuntimeError: For ``folder`` and ``streaming`` before :meth:`setup` (the classes
                come from disk).
        """
        dataset = self.hparams.dataset
        if dataset == "synthetic":
            return self.hparams.synthetic_num_classes
        if dataset not in ("folder", "streaming"):
            return _NUM_CLASSES[dataset]
        if self._folder_classes is None:
            raise RuntimeError(f"num_classes of a {dataset} dataset is known after setup()")
        return len(self._folder_classes) or None

    @property
    def has_labels(self) -> bool:
        """Whether the data has class labels, as k-NN evaluation needs."""
        return self.num_classes is not None

    def prepare_data(self) -> None:
        """Download the dataset files once per node when ``download`` is set."""
        hp = self.hparams
        if not hp.download:
            return
        if hp.dataset == "fashion_mnist":
            for train in (True, False):
                load_fashion_mnist(hp.data_dir, train=train, download=True)
        else:
            for split in ("train", "test") if hp.dataset == "cifar10" else ("train+unlabeled",):
                torchvision_dataset(hp.dataset, hp.data_dir, split, download=True)

    @property
    def augmentation(self) -> str:
        """Where augmentation runs this time: ``auto`` resolved against the trainer's device."""
        chosen = self.hparams.augmentation
        if chosen != "auto":
            return chosen
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return "device" if on_gpu else "batched"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``device`` augmentation, make the crops of a training batch on its device.

        Args:
            batch: ``(images, labels)`` from the training loader: uint8 (C, H, W) images
                already on the training device (a stacked tensor or a list of any sizes).
            dataloader_idx: Index of the dataloader.

        Returns:
            ``(crops, labels)`` (with Gram crops ``{"crops", "gram_crops", "labels"}``); other
            batches are returned unchanged.
        """
        raw = (
            isinstance(batch, tuple | list)
            and len(batch) in (2, 3)
            and isinstance(batch[0], list)
            and batch[0][0].dtype == torch.uint8
        )
        if self.augmentation != "device" or not raw:
            return batch
        images, labels, *tag = batch
        transform = self._batched_transforms()[int(tag[0]) if tag else 0]
        return with_labels(transform.augment(images), labels)

    def _batched_transforms(self) -> list[BatchedMultiCropTransform]:
        """The batch-wise transform of each crop-size variant (one without a size mix)."""
        if self.size_mix is None:
            return [self.batched_transform]
        if getattr(self, "_mixed", None) is None:
            self._mixed = [BatchedMultiCropTransform(crops) for crops in self.crop_variants]
        return self._mixed

    def setup(self, stage: str | None = None) -> None:
        """Build the training and k-NN datasets (once; later calls do nothing).

        Args:
            stage: Lightning stage; every stage gets all datasets.

        Raises:
            ValueError: If ``batch_size`` exceeds the training images per device.
        """
        if self.train_dataset is not None:
            return
        if self.hparams.dataset == "streaming":
            self._setup_streaming()
            return
        train, knn_train, knn_val, self._folder_classes = build_splits(
            self.hparams, self._decode_sizes()
        )
        train = self._subset(train)
        if self.size_mix is not None:
            variants = [MultiCropTransform(crops) for crops in self.crop_variants]
            self.train_dataset = TaggedDataset(train, variants)
            self._train_images = TaggedDataset(train, [to_uint8_tensor], keep_tag=True)
        else:
            self.train_dataset = TransformDataset(train, self.train_transform)
            self._train_images = TransformDataset(train, to_uint8_tensor)
        if knn_train is not None:
            self.knn_train_dataset = TransformDataset(self._subset(knn_train), self.eval_transform)
        if knn_val is not None:
            self.knn_val_dataset = TransformDataset(self._subset(knn_val), self.eval_transform)
        self._check_batch_size(len(self.train_dataset))

    def _setup_streaming(self) -> None:
        """Open a prepared dataset: LitData streams for training, random access for k-NN."""
        prepared = PreparedDataset.open(self.hparams.data_dir, self.hparams.cache_dir)
        self._folder_classes = prepared.classes
        self._train_size = prepared.train_size
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything
        sizes = self._decode_sizes()
        self.train_dataset = prepared.train_stream(self.train_transform, seed, sizes)
        if self.batched_transform is not None:
            self._train_images = prepared.train_stream(None, seed, sizes)
        for name, split in [("knn_train", prepared.knn_train()), ("knn_val", prepared.knn_val())]:
            if split is not None:
                setattr(self, f"{name}_dataset", TransformDataset(split, self.eval_transform))
        self._check_batch_size(prepared.train_size)

    def _decode_sizes(self) -> dict[str, int]:
        """Reduced-size JPEG decoding that no training crop or evaluation resize upsamples."""
        views = []
        for crops in self.crop_variants:
            largest = max(crops.global_crop_size, crops.gram_crop_size)  # a Gram crop's box
            views.append((largest, crops.global_crop_scale))
            if crops.n_local_crops:
                views.append((crops.local_crop_size, crops.local_crop_scale))
        return {"min_pixels": min_decode_pixels(views), "min_side": self.eval_transform.resize}

    def _subset(self, dataset: Dataset) -> Dataset:
        """At most ``subset`` samples of ``dataset``, a fixed random draw kept in order."""
        limit, size = self.hparams.subset, len(dataset)  # type: ignore[arg-type]
        if limit is None or limit >= size:
            return dataset
        generator = torch.Generator().manual_seed(SPLIT_SEED)
        return Subset(dataset, sorted(torch.randperm(size, generator=generator)[:limit].tolist()))

    def _check_batch_size(self, n_images: int) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_device = n_images // world_size
        if self.hparams.batch_size > per_device:
            raise ValueError(
                f"{setting('data', 'batch_size', self.hparams.batch_size)} exceeds the "
                f"{per_device} training images per device ({n_images} images over {world_size} "
                f"device(s)), so drop_last would leave no batch; lower "
                f"{setting('data', 'batch_size')} or use more data"
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled multi-crop batches ``(crops, labels)``, dropping the last partial batch.

        The order is a seeded shuffle per epoch (seed of ``seed_everything``), sharded over the
        processes, and resumes mid-epoch from a checkpoint (see
        :class:`~lightning_dino.data.sampler.ResumableDataLoader`; for ``streaming``, LitData's
        ``StreamingDataLoader``, sharded over processes and workers).

        Returns:
            A DataLoader yielding a list of ``n_crops`` float32 tensors
            (batch_size, 3, H, W), globals first, and int64 labels (batch_size,).
        """
        self.setup()
        workers = self._num_workers()
        mode = self.augmentation
        if mode == "per_sample":
            images, collate = self.train_dataset, collate_views
        elif mode == "batched":
            images, collate = self._train_images, MixedCollate(self._batched_transforms())
        else:  # device: the workers only decode
            images, collate = self._train_images, collate_tagged_images
        if self.hparams.dataset == "streaming":  # LitData shuffles, shards and resumes
            return streaming_loader(
                images, self.hparams.batch_size, workers, collate, self._pin_memory()
            )
        self._train_sampler = EpochSampler.for_trainer(images, self.trainer, self._train_sampler)
        if self.size_mix is not None:  # every batch's crop sizes, drawn from (seed, epoch, step)
            self._train_sampler.tag_batches(self.size_mix.choice, self.hparams.batch_size)
        return ResumableDataLoader(
            images,
            batch_size=self.hparams.batch_size,
            sampler=self._train_sampler,
            drop_last=True,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self._pin_memory(),
            persistent_workers=workers > 0,
        )

    def knn_train_dataloader(self) -> DataLoader:
        """Labelled reference images for k-NN evaluation, in a fixed order.

        Returns:
            A DataLoader yielding float32 images (B, 3, eval_size, eval_size) and int64
            labels (B,).

        Raises:
            RuntimeError: If the data has no labels.
        """
        self.setup()
        return self._eval_loader(self.knn_train_dataset, "k-NN train")

    def knn_val_dataloader(self) -> DataLoader:
        """Labelled query images for k-NN evaluation, in a fixed order.

        Returns:
            A DataLoader yielding float32 images (B, 3, eval_size, eval_size) and int64
            labels (B,).

        Raises:
            RuntimeError: If the data has no labels or no held-out images.
        """
        self.setup()
        return self._eval_loader(self.knn_val_dataset, "k-NN val")

    def _eval_loader(self, dataset: Dataset | None, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(self._no_knn_data_message(name))
        return DataLoader(
            dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self._num_workers(),
            pin_memory=self._pin_memory(),
        )

    def _no_knn_data_message(self, name: str) -> str:
        root = self.hparams.data_dir
        if not self.has_labels:
            return (
                f"{name} data needs labels, but the image folder {root} has no class "
                f"subfolders; arrange it as {root}/<class>/<image> or turn k-NN evaluation off"
            )
        return (
            f"no {name} data: {root} has no val/<class>/ images and "
            f"{setting('data', 'val_fraction', self.hparams.val_fraction)} holds out no "
            "labelled image; raise it, or add "
            "labelled images, or turn k-NN evaluation off"
        )

    def _num_workers(self) -> int:
        if self.hparams.num_workers is not None:
            return self.hparams.num_workers
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return min(max(available_cpus() // devices, 1), _MAX_DEFAULT_WORKERS)

    def _pin_memory(self) -> bool:
        pin = self.hparams.pin_memory
        return torch.cuda.is_available() if pin is None else pin

    def describe(self) -> str:
        """Summarise the data, crops and loader settings in a few lines.

        Returns:
            A human-readable multi-line description.
        """
        hp = self.hparams
        lines = [
            f"dataset: {hp.dataset}" + (f" ({hp.data_dir})" if hp.data_dir else ""),
            f"crops: {hp.n_global_crops} x {hp.global_crop_size}px + "
            f"{hp.n_local_crops} x {hp.local_crop_size}px",
            f"batch_size: {hp.batch_size} per device, workers: {self._num_workers()}",
        ]
        if self.train_dataset is None:
            return "\n".join([*lines, "datasets: not set up"])
        for name, dataset in [
            ("train", self.train_dataset),
            ("knn_train", self.knn_train_dataset),
            ("knn_val", self.knn_val_dataset),
        ]:
            if name == "train" and self._train_size is not None:
                size = self._train_size  # a stream's len() is this process's share
            else:
                size = "no" if dataset is None else len(dataset)  # type: ignore[arg-type]
            lines.append(f"{name}: {size} images")
        return "\n".join(lines)
