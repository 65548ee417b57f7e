import re

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_dino.data import builtin_datasets
from lightning_dino.data import datamodule as datamodule_module
from lightning_dino.data.datamodule import MultiCropDataModule

TINY = {
    "batch_size": 4,
    "num_workers": 0,
    "global_crop_size": 16,
    "local_crop_size": 8,
    "n_local_crops": 2,
    "eval_size": 12,
}


def check_train_batch(batch, batch_size=4, n_local=2, global_size=16, local_size=8):
    crops, labels = batch
    assert isinstance(crops, list) and len(crops) == 2 + n_local
    shapes = [tuple(crop.shape) for crop in crops]
    global_shape = (batch_size, 3, global_size, global_size)
    assert shapes == [global_shape] * 2 + [(batch_size, 3, local_size, local_size)] * n_local
    assert all(crop.dtype == torch.float32 for crop in crops)
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    return labels


def check_eval_loader(loader, size, expected_len):
    batches = list(loader)
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert images.shape == (expected_len, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (expected_len,) and labels.dtype == torch.int64
    assert (labels >= 0).all()
    return labels


def write_class_tree(root, write_image, per_class=6, classes=("cat", "dog")):
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{i}.png", seed=i)


def test_synthetic_batches_and_knn_loaders():
    dm = MultiCropDataModule(**TINY, synthetic_size=20, synthetic_image_size=10)
    assert dm.n_crops == 4 and dm.num_classes == 10 and dm.has_labels
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5  # 20 // 4, last partial batch dropped
    labels = check_train_batch(next(iter(loader)))
    assert ((labels >= 0) & (labels < 10)).all()
    first = check_eval_loader(dm.knn_train_dataloader(), 12, 20)
    assert torch.equal(first, check_eval_loader(dm.knn_train_dataloader(), 12, 20))  # fixed order
    check_eval_loader(dm.knn_val_dataloader(), 12, 5)
    assert "train: 20 images" in dm.describe()


def test_train_loader_drops_the_last_partial_batch_and_shuffles():
    dm = MultiCropDataModule(**{**TINY, "batch_size": 6}, synthetic_size=20, synthetic_image_size=8)
    torch.manual_seed(0)
    epochs = [torch.cat([labels for _, labels in dm.train_dataloader()]) for _ in range(2)]
    assert [len(e) for e in epochs] == [18, 18]
    assert not torch.equal(epochs[0], epochs[1])


def test_worker_processes_and_persistent_workers():
    dm = MultiCropDataModule(**{**TINY, "num_workers": 1}, synthetic_size=8, synthetic_image_size=8)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not dm.knn_val_dataloader().persistent_workers
    check_train_batch(next(iter(loader)))


def test_folder_with_classes_holds_out_a_fixed_fraction(tmp_path, write_image):
    write_class_tree(tmp_path, write_image)
    write_image(tmp_path / "unlabelled.png")
    dm = MultiCropDataModule("folder", str(tmp_path), **TINY, val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 2 and dm.has_labels
    assert len(dm.train_dataset) == 10  # 12 labelled - 3 held out + 1 unlabelled
    assert len(dm.knn_train_dataset) == 9 and len(dm.knn_val_dataset) == 3
    train_indices = set(dm.train_dataset.dataset.indices)  # Subsets of the same folder
    assert not train_indices & set(dm.knn_val_dataset.dataset.indices)
    check_train_batch(next(iter(dm.train_dataloader())))
    check_eval_loader(dm.knn_train_dataloader(), 12, 9)
    check_eval_loader(dm.knn_val_dataloader(), 12, 3)
    again = MultiCropDataModule("folder", str(tmp_path), **TINY, val_fraction=0.25)
    again.setup()
    assert again.knn_val_dataset.dataset.indices == dm.knn_val_dataset.dataset.indices


def test_folder_with_train_and_val_subfolders(tmp_path, write_image):
    write_class_tree(tmp_path / "train", write_image, per_class=4)
    write_class_tree(tmp_path / "val", write_image, per_class=2, classes=("dog",))
    dm = MultiCropDataModule("folder", str(tmp_path), **TINY)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.train_dataset) == 8
    assert check_eval_loader(dm.knn_val_dataloader(), 12, 2).tolist() == [1, 1]  # "dog" = 1
    check_eval_loader(dm.knn_train_dataloader(), 12, 8)


def test_folder_with_only_a_train_subfolder_holds_out_from_it(tmp_path, write_image):
    write_class_tree(tmp_path / "train", write_image, per_class=5)
    dm = MultiCropDataModule("folder", str(tmp_path), **TINY, val_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 2  # the classes under train/, not a class named "train"
    assert len(dm.knn_train_dataset) == 8 and len(dm.knn_val_dataset) == 2


def test_flat_folder_trains_but_has_no_knn_data(tmp_path, write_image):
    for i in range(5):
        write_image(tmp_path / f"{i}.jpg", seed=i)
    dm = MultiCropDataModule("folder", str(tmp_path), **TINY)
    with pytest.raises(RuntimeError, match="after setup"):
        _ = dm.num_classes
    dm.setup()
    assert dm.num_classes is None and not dm.has_labels
    labels = check_train_batch(next(iter(dm.train_dataloader())))
    assert (labels == -1).all()
    for loader in (dm.knn_train_dataloader, dm.knn_val_dataloader):
        with pytest.raises(RuntimeError, match=f"needs labels.*{tmp_path}/<class>/<image>"):
            loader()


def test_folder_without_held_out_images(tmp_path, write_image):
    write_class_tree(tmp_path, write_image, per_class=3)
    dm = MultiCropDataModule("folder", str(tmp_path), **TINY, val_fraction=0.0)
    check_eval_loader(dm.knn_train_dataloader(), 12, 6)
    with pytest.raises(RuntimeError, match="val_fraction"):
        dm.knn_val_dataloader()


def test_folder_errors_surface_at_setup(tmp_path):
    dm = MultiCropDataModule("folder", str(tmp_path / "missing"), **TINY)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        dm.setup()


def test_fashion_mnist_from_idx_files(tmp_path, write_fashion_mnist):
    write_fashion_mnist(tmp_path, n_train=12, n_test=5)
    fashion = {"global_crop_size": 28, "local_crop_size": 12, "eval_size": 28, "eval_resize": 28}
    dm = MultiCropDataModule("fashion_mnist", str(tmp_path), **{**TINY, **fashion})
    dm.setup()
    assert dm.num_classes == 10
    check_train_batch(next(iter(dm.train_dataloader())), global_size=28, local_size=12)
    check_eval_loader(dm.knn_train_dataloader(), 28, 12)
    check_eval_loader(dm.knn_val_dataloader(), 28, 5)


@pytest.mark.skipif(
    not (builtin_datasets.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="apt package dataset-fashion-mnist absent",
)
def test_fashion_mnist_subset_from_the_debian_package():
    dm = MultiCropDataModule("fashion_mnist", **TINY, subset=16)
    dm.setup()
    assert len(dm.train_dataset) == len(dm.knn_train_dataset) == len(dm.knn_val_dataset) == 16
    check_train_batch(next(iter(dm.train_dataloader())))
    check_eval_loader(dm.knn_val_dataloader(), 12, 16)


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_torchvision_datasets_missing_without_download(tmp_path, name):
    dm = MultiCropDataModule(name, str(tmp_path), **TINY)
    assert dm.num_classes == 10
    dm.prepare_data()  # nothing to download
    with pytest.raises(FileNotFoundError, match=r"MultiCropDataModule\(download=True\)"):
        dm.setup()


def test_batch_larger_than_the_data_is_an_error():
    dm = MultiCropDataModule(**{**TINY, "batch_size": 9}, synthetic_size=8, synthetic_image_size=8)
    with pytest.raises(ValueError, match=r"MultiCropDataModule\(batch_size=9\) exceeds the 8 training images"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "MultiCropDataModule(batch_size=...) must be >= 1"),
        ({"num_workers": -1}, "MultiCropDataModule(num_workers=...) must be >= 0"),
        ({"dataset": "imagenet"}, "MultiCropDataModule(dataset=...) must be one of"),
        ({"dataset": "folder"}, "MultiCropDataModule(data_dir=...) is required for MultiCropDataModule(dataset='folder')"),
        ({"dataset": "cifar10"}, "MultiCropDataModule(data_dir=...) is required"),
        ({"download": True}, "MultiCropDataModule(download=...) applies to"),
        ({"global_crop_scale": (0.5, 0.2)}, "MultiCropDataModule(global_crop_scale=...) must satisfy"),
        ({"blur_p": (1.0, 2.0, 0.5)}, "MultiCropDataModule(blur_p=...) must be"),
        ({"eval_size": 32, "eval_resize": 30}, "MultiCropDataModule(eval_resize=30) must be >= the k-NN image size"),
        ({"val_fraction": 1.0}, "MultiCropDataModule(val_fraction=...) must be in"),
        ({"subset": 0}, "MultiCropDataModule(subset=...) must be >= 1"),
    ],
)
def test_invalid_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MultiCropDataModule(**kwargs)


def test_hyperparameters_and_defaults(monkeypatch):
    monkeypatch.setattr(datamodule_module, "available_cpus", lambda: 32)
    dm = MultiCropDataModule()
    assert dm.hparams.dataset == "synthetic" and dm.hparams.global_crop_size == 224
    assert dm.hparams.blur_p == (1.0, 0.1, 0.5) and dm.n_crops == 10
    assert dm._num_workers() == 8 and dm._pin_memory() == torch.cuda.is_available()
    assert dm.eval_transform.size == 224 and dm.eval_transform.resize == 256
    assert MultiCropDataModule(num_workers=0)._num_workers() == 0


def test_signature_is_usable_by_lightning_cli():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultiCropDataModule, "data")
    config = parser.parse_args(
        ["--data.dataset=folder", "--data.global_crop_scale=[0.3, 1.0]", "--data.num_workers=2"]
    )
    assert config.data.dataset == "folder" and config.data.global_crop_scale == (0.3, 1.0)
    assert config.data.num_workers == 2 and config.data.data_dir is None
    with pytest.raises(Exception, match="dataset"):
        parser.parse_args(["--data.dataset=imagenet"])
    assert "Training images per device" in parser.format_help()


def test_a_file_failing_in_a_worker_does_not_crash_the_epoch(tmp_path, write_image):
    write_class_tree(tmp_path, write_image, per_class=4)
    dm = MultiCropDataModule("folder", str(tmp_path), **{**TINY, "num_workers": 1}, val_fraction=0)
    dm.setup()
    (tmp_path / "cat" / "1.png").write_bytes(b"changed after validation")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    check_train_batch(batches[0])


class CropConsumer(pl.LightningModule):
    """Minimal module reading multi-crop batches, standing in for the DINO module."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        crops, labels = batch
        loss = sum(self.layer(crop.mean((2, 3))).mean() for crop in crops)
        self.log("loss", loss, batch_size=len(labels))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_consumes_the_batches():
    dm = MultiCropDataModule(**TINY, synthetic_size=16, synthetic_image_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        fast_dev_run=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CropConsumer(), datamodule=dm)
    assert trainer.global_step == 2
