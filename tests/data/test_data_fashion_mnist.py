import gzip

import numpy as np
import pytest
import torch

from lightning_dino.data import builtin_datasets
from lightning_dino.data.builtin_datasets import load_fashion_mnist, read_idx_file

DEBIAN_FILES = builtin_datasets.DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def no_debian_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")


@pytest.mark.skipif(not DEBIAN_FILES.exists(), reason="apt package dataset-fashion-mnist absent")
def test_debian_package():
    images, labels = load_fashion_mnist(None, train=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published test-set order


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
def test_idx_files_round_trip(tmp_path, write_fashion_mnist, no_debian_copy, gz, layout):
    written = write_fashion_mnist(tmp_path / layout, n_train=7, n_test=3, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_fashion_mnist(tmp_path, train=train)
        assert torch.equal(images, torch.from_numpy(written[prefix][0]))
        assert torch.equal(labels, torch.from_numpy(written[prefix][1]).long())
        assert labels.dtype == torch.int64


def test_data_dir_is_searched_before_the_debian_copy(tmp_path, write_fashion_mnist):
    written = write_fashion_mnist(tmp_path, n_train=4, n_test=2)
    images, _ = load_fashion_mnist(str(tmp_path), train=False)
    assert torch.equal(images, torch.from_numpy(written["t10k"][0]))


def test_missing_files_list_the_places_searched_and_the_fixes(tmp_path, no_debian_copy):
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist(tmp_path, train=True)
    message = str(error.value)
    for expected in (
        "train-images-idx3-ubyte",
        str(tmp_path),
        str(tmp_path / "FashionMNIST" / "raw"),
        str(tmp_path / "not-installed"),
        "apt-get install dataset-fashion-mnist",
        "MultiCropDataModule(download=True)",
    ):
        assert expected in message
    with pytest.raises(ValueError, match="data_dir"):
        load_fashion_mnist(None, train=True, download=True)


def test_labels_without_images_are_not_enough(tmp_path, write_idx, no_debian_copy):
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist(tmp_path, train=True)


def test_invalid_idx_files(tmp_path, write_idx, no_debian_copy):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x02" + b"ab"))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx_file(path)
    write_idx(tmp_path / "y", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"declares shape \(2, 3\)"):
        read_idx_file(tmp_path / "y")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected"):
        load_fashion_mnist(tmp_path, train=True)
