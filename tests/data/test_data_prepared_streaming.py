"""Streaming datasets: `lightning-dino prepare` and `--data.dataset streaming` (LitData), sharding over
gloo ranks and workers, resume after SIGKILL with the images not yet seen, and damaged chunks named
with the fix."""

import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dino import prepare_streaming_dataset
from lightning_dino.cli import _with_bare_flags_true, main
from lightning_dino.data import MultiCropDataModule, StreamingImages, decode_image, load_image
from lightning_dino.data.prepared.streaming import PreparedDataset, split_dir
from lightning_dino.data.prepared.writer import file_problem, plan_splits, scan_layout
from lightning_dino.setting_names import cli_flags
from tests.conftest import run_on_gloo

ROOT = Path(__file__).parents[2]
CONF = Path(__file__).parents[1] / "conf"
N_IMAGES = 12
CROPS = {"global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2}


def write_image(path: Path, seed: int, size=(32, 32)) -> None:
    """A random RGB image, PNG or JPEG by the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def prepare(data_dir, out, **kwargs):
    return prepare_streaming_dataset(data_dir, out, num_workers=2, progress=False, **kwargs)


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory):
    """12 images, each in its own class folder, prepared without a val split: label == image id."""
    root = tmp_path_factory.mktemp("identity")
    for i in range(N_IMAGES):
        write_image(root / "images" / f"c{i:02d}" / f"{i}.{'png' if i % 2 else 'jpg'}", seed=i)
    prepare(root / "images", root / "prepared", val_fraction=0.0)
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Three classes of PNGs and JPEGs of two sizes, an unlabelled image at the top, a corrupt JPEG."""
    root = tmp_path_factory.mktemp("mixed") / "images"
    for i in range(9):
        write_image(root / "abc"[i % 3] / f"{i}.{'png' if i % 2 else 'jpg'}", seed=i, size=(32, 40 + i % 2 * 8))
    write_image(root / "loose.png", seed=99)
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_prepare_stores_each_files_bytes_and_label_in_the_splits_folder_makes(mixed_folder, tmp_path):
    out = tmp_path / "prepared"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*\n.*bad\.jpg"):
        metadata = prepare(mixed_folder, out, val_fraction=0.25)
    assert metadata["classes"] == ["a", "b", "c"]
    assert metadata["splits"] == {"train": {"size": 7, "labelled": 6}, "val": {"size": 3, "labelled": 3}}
    assert [Path(path).name for path, _ in metadata["skipped"]] == ["bad.jpg"]

    # The same hold-out and labels as --data.dataset folder (which also skips bad.jpg).
    with pytest.warns(UserWarning, match="bad.jpg"):
        folder = MultiCropDataModule("folder", str(mixed_folder), batch_size=2, val_fraction=0.25, **CROPS)
        folder.setup()
    images = folder.knn_train_dataset.dataset.dataset
    folder_val = [images.samples[i] for i in folder.knn_val_dataset.dataset.indices]
    folder_train = [images.samples[i] for i in folder.train_dataset.dataset.indices]
    unreadable = {str(mixed_folder / "a" / "bad.jpg")}
    for split, want in [("val", folder_val), ("train", folder_train)]:
        planned = plan_splits(scan_layout(mixed_folder), 0.25, unreadable)[1][split]
        assert sorted(planned) == sorted(want)
        stored = StreamingImages(str(out / split)).dataset
        items = [stored[i] for i in range(len(stored))]
        assert [item["index"] for item in items] == list(range(len(planned)))  # order kept
        for item, (path, label) in zip(items, planned, strict=True):
            assert bytes(item["image"]) == Path(path).read_bytes()  # encoded bytes, as found
            assert item["label"] == label
    assert [label for _, label in planned][-1] == -1  # unlabelled images last in train
    # Decoding the stored bytes gives what the folder pipeline decodes.
    assert torch.equal(decode_image(Path(planned[0][0]).read_bytes()), load_image(planned[0][0]))


def test_prepare_refuses_an_existing_output_unless_told_and_stops_on_corrupt_files(mixed_folder, tmp_path):
    out = tmp_path / "prepared"
    with pytest.raises(ValueError, match=r"1 unreadable image file\(s\)(.|\n)*bad\.jpg(.|\n)*prepare_streaming_dataset\(skip_corrupt=True\)"):
        prepare(mixed_folder, out, skip_corrupt=False)
    assert not out.exists()
    with pytest.warns(UserWarning, match="bad.jpg"):
        prepare(mixed_folder, out, val_fraction=0.0)
    with pytest.raises(FileExistsError, match=r"already holds a prepared dataset; pass prepare_streaming_dataset\(overwrite=True\)"):
        prepare(mixed_folder, out)
    # The command line accepts a bare --overwrite.
    with pytest.warns(UserWarning, match="bad.jpg"):
        main(["prepare", "--data_dir", str(mixed_folder), "--out", str(out), "--overwrite",
              "--num_workers", "1", "--progress", "false"])
    assert PreparedDataset.open(str(out)).val_size == 1
    other = tmp_path / "not_prepared"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a prepared dataset"):
        prepare(mixed_folder, other, overwrite=True)
    assert (other / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match=r"written by `prepare_streaming_dataset\('FOLDER', 'DIR'\)`"):
        MultiCropDataModule("streaming", str(other)).setup()


def test_bare_boolean_flags_and_file_checks():
    def tool(out: str, overwrite: bool = False, progress: bool = True) -> None:
        """Tool."""

    assert _with_bare_flags_true(tool, ["--overwrite", "--out", "x", "--progress"]) == [
        "--overwrite", "true", "--out", "x", "--progress", "true"]
    assert _with_bare_flags_true(tool, ["--overwrite", "false", "--out", "--overwrite"]) == [
        "--overwrite", "false", "--out", "--overwrite", "true"]
    assert split_dir("s3://bucket/data/", "train") == "s3://bucket/data/train"
    assert file_problem(__file__).startswith("UnidentifiedImageError")


@pytest.mark.parametrize("augmentation", ["per_sample", "batched", "device"])
def test_streaming_batches_have_the_folder_shapes_and_each_image_once_per_epoch(identity_data, augmentation):
    data = MultiCropDataModule("streaming", str(identity_data / "prepared"), batch_size=3, num_workers=0,
                               augmentation=augmentation, **CROPS)
    data.setup()
    assert data.num_classes == N_IMAGES
    loader = data.train_dataloader()
    epochs = []
    for _ in range(2):
        labels = []
        for batch in loader:
            crops, batch_labels = data.on_after_batch_transfer(batch, 0)
            assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
            assert all(c.dtype == torch.float32 for c in crops)
            labels += batch_labels.tolist()
        assert sorted(labels) == list(range(N_IMAGES))
        epochs.append(labels)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    if augmentation == "device":  # the workers hand over the decoded files
        images, labels = next(iter(loader))
        for image, label in zip(images, labels.tolist(), strict=True):
            path = next((identity_data / "images" / f"c{label:02d}").iterdir())
            assert torch.equal(image, load_image(path))


def test_streaming_knn_splits_mirror_the_folder_ones(identity_data, mixed_folder, tmp_path):
    data = MultiCropDataModule("streaming", str(identity_data / "prepared"), batch_size=4, num_workers=0, **CROPS)
    data.setup()
    images, labels = next(iter(data.knn_train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3]  # fixed order
    with pytest.raises(RuntimeError, match="no k-NN val data"):
        data.knn_val_dataloader()

    with pytest.warns(UserWarning, match="bad.jpg"):
        prepare(mixed_folder, tmp_path / "prepared", val_fraction=0.25)
    kinds = {}
    for dataset, data_dir in [("folder", mixed_folder), ("streaming", tmp_path / "prepared")]:
        with pytest.warns(UserWarning, match="bad.jpg") if dataset == "folder" else nullcontext():
            module = MultiCropDataModule(dataset, str(data_dir), batch_size=2, num_workers=0, val_fraction=0.25,
                                         augmentation="batched", **CROPS)
            module.setup()
        kinds[dataset] = [torch.cat([b[1] for b in getattr(module, f"knn_{name}_dataloader")()]).tolist()
                          for name in ("train", "val")] + [module.num_classes]
        val_images = torch.cat([b[0] for b in module.knn_val_dataloader()])
        kinds[dataset].append(val_images.sum().item())
    # The same labelled train images, the same held-out images (same pixels), the same classes.
    assert sorted(kinds["folder"][0]) == sorted(kinds["streaming"][0])
    assert kinds["folder"][1:] == kinds["streaming"][1:]


def _damage(data_dir: Path, how: str) -> Path:
    """Damage data_dir/train/chunk-0-0.bin (6 items, header of 4 * 8 bytes) as a disk or a copy may."""
    chunk = data_dir / "train" / "chunk-0-0.bin"
    data = bytearray(chunk.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "missing":
        chunk.unlink()
        return chunk
    elif how == "zeroed header":
        data[:32] = bytes(32)
    elif how == "zeroed items":  # same size, header intact: only reading the items shows it
        data[32:] = bytes(len(data) - 32)
    elif how == "zeroed image":  # the middle of item 1's image bytes (its item header intact)
        begin, end = struct.unpack_from("<2I", data, 8)
        middle = (begin + end) // 2
        data[middle - 100 : middle + 100] = bytes(200)
    chunk.write_bytes(bytes(data))
    return chunk


@pytest.mark.parametrize("how", ["truncated", "missing", "zeroed header"])
def test_a_truncated_or_zeroed_chunk_stops_setup_naming_it_and_the_prepare_command(identity_data, tmp_path, how):
    data_dir = tmp_path / "prepared"
    shutil.copytree(identity_data / "prepared", data_dir)
    chunk = _damage(data_dir, how)
    # Before any loader worker starts, instead of LitData's struct.error or "Timed out after 2s waiting".
    data = MultiCropDataModule("streaming", str(data_dir), batch_size=3, num_workers=0, **CROPS)
    with pytest.raises(ValueError, match=rf"{re.escape(str(chunk))} is damaged: .*") as raised:
        data.setup()
        next(iter(data.train_dataloader()))
    assert type(raised.value).__name__ == "CorruptDatasetError"
    message = str(raised.value)
    source = str(identity_data / "images")
    assert f"prepare_streaming_dataset({source!r}, {str(data_dir)!r}, overwrite=True)" in message
    assert {"truncated": "(truncated?)", "missing": "missing", "zeroed header": "counts 0 items"}[how] in message
    with cli_flags(), pytest.raises(ValueError, match=re.escape(
            f"prepare the folder again: `lightning-dino prepare --data_dir {source} --out {data_dir} --overwrite`")):
        PreparedDataset.open(str(data_dir))


@pytest.mark.parametrize("how", ["zeroed items", "zeroed image"])
def test_damage_inside_a_chunks_items_names_the_chunk_when_read(identity_data, tmp_path, how):
    data_dir = tmp_path / "prepared"
    shutil.copytree(identity_data / "prepared", data_dir)
    chunk = _damage(data_dir, how)
    data = MultiCropDataModule("streaming", str(data_dir), batch_size=3, num_workers=0, **CROPS)
    data.setup()  # the size and the header match index.json
    source = str(identity_data / "images")
    expected = (rf"{re.escape(str(chunk))} is damaged: item \d+ of {re.escape(str(data_dir / 'train'))} cannot be "
                rf"read \((struct\.error|OSError): .*\); prepare the folder again: "
                + re.escape(f"`prepare_streaming_dataset({source!r}, {str(data_dir)!r}, overwrite=True)`"))
    with pytest.raises(ValueError, match=expected):  # instead of struct.error from inside LitData
        list(data.knn_train_dataloader())
    if how == "zeroed items":  # the training stream, read in a loader worker
        data = MultiCropDataModule("streaming", str(data_dir), batch_size=3, num_workers=1, **CROPS)
        data.setup()
        with pytest.raises(ValueError, match=expected):
            list(data.train_dataloader())


def _epoch_labels(data_dir: str, rank: int) -> list[list[int]]:
    """This rank's labels over two epochs of the streaming loader with 2 workers."""
    # Forked loader workers, as in a process started by torchrun (mp.spawn made this one spawn them).
    multiprocessing.set_start_method("fork", force=True)
    data = MultiCropDataModule("streaming", data_dir, batch_size=3, num_workers=2, augmentation="device", **CROPS)
    data.setup()
    loader = data.train_dataloader()
    return [[label for _, labels in loader for label in labels.tolist()] for _ in range(2)]


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.timeout(120)
def test_two_gloo_ranks_with_two_workers_each_see_a_disjoint_part_and_together_everything(identity_data, tmp_path):
    ranks = run_on_gloo(partial(_epoch_labels, str(identity_data / "prepared")), tmp_path)
    for epoch in range(2):
        first, second = (ranks[rank][epoch] for rank in range(2))
        assert len(first) == len(second) == N_IMAGES // 2
        assert sorted(first + second) == list(range(N_IMAGES)), (first, second)
    assert ranks[0][0] != ranks[0][1]


def run_fit(args, cwd, returncode=0):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "lightning_dino", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=150)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result.stderr


@pytest.mark.timeout(240)
def test_resume_after_sigkill_continues_with_the_images_not_yet_seen(identity_data, tmp_path, monkeypatch):
    data_dir = str(identity_data / "prepared")
    # 12 images, batch 3: 4 steps per epoch, 8 in all; last.ckpt at steps 3, 4 (epoch end) and 6.
    run = ["fit", "--config", str(CONF / "tiny_vit.yaml"), "--seed_everything=0", "--data.dataset=streaming",
           f"--data.data_dir={data_dir}", "--data.batch_size=3", "--data.num_workers=2",
           "--data.augmentation=batched", "--trainer.max_epochs=2", "--checkpoint.last_every_n_train_steps=3"]
    probes = "tests.scripts.probes"
    # Killed when the batch after step 7 starts: last.ckpt holds step 6, two batches into epoch 1.
    run_fit([*run, f"--trainer.callbacks+={probes}.KillAtStep", "--trainer.callbacks.step=7"], tmp_path, -9)
    last_file = tmp_path / "runs" / "dino" / "version_0" / "checkpoints" / "last.ckpt"
    last = torch.load(last_file, weights_only=False)
    assert last["global_step"] == 6
    loader_state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["num_samples_yielded"] == 6  # LitData's StreamingDataLoader state, saved by Lightning

    stderr = run_fit([*run, f"--trainer.callbacks+={probes}.DumpState",
                      f"--trainer.callbacks.out_dir={tmp_path / 'out'}", "--ckpt_path", "last"], tmp_path)
    assert "not resumable" not in stderr
    rows = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)["rows"]
    assert [row["step"] for row in rows] == [7, 8]

    # The order an uninterrupted run takes: the same loader, built here in the same way.
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    reference = MultiCropDataModule("streaming", data_dir, batch_size=3, num_workers=2, augmentation="device", **CROPS)
    reference.setup()
    loader = reference.train_dataloader()
    batches = [labels.tolist() for _ in range(2) for _, labels in loader]
    assert [row["labels"].tolist() for row in rows] == batches[6:8]
    assert sorted(label for batch in batches[4:8] for label in batch) == list(range(N_IMAGES))
