"""Sharded checkpoint folders read in one process and consolidated: the weights come back exactly,
and what reads files (load_from_checkpoint) reads the consolidated one. (Folders written by a
two-rank run: tests/training/test_training_sharding.py.)"""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_dino import DINO, load_backbone
from lightning_dino.io.export import read_checkpoint
from lightning_dino.io.sharded_checkpoints import consolidate, is_sharded_checkpoint
from tests.conftest import TINY_VIT


@pytest.fixture
def folder(tmp_path):
    """A checkpoint folder as a sharded run writes it: the weights by DCP, the rest in meta.pt."""
    torch.manual_seed(0)
    model = DINO(**TINY_VIT)
    path = tmp_path / "last.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": model.state_dict()}, checkpoint_id=str(path))
    meta = {"hyper_parameters": dict(model.hparams), "epoch": 1, "global_step": 6,
            "evaluated_network": "teacher", "pytorch-lightning_version": "2.6.0"}
    torch.save(meta, path / "meta.pt")
    return path, model


def test_the_folder_reads_as_a_single_file_checkpoint(folder):
    path, model = folder
    assert is_sharded_checkpoint(path) and not is_sharded_checkpoint(path.parent)
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == 6
    expected = model.state_dict()
    assert checkpoint["state_dict"].keys() == expected.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in expected.items())
    backbone = load_backbone(str(path))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(images), model.teacher.backbone.eval()(images))


def test_consolidate_writes_a_file_that_load_from_checkpoint_reads(folder, tmp_path, capsys):
    path, model = folder
    written = consolidate(str(path), str(tmp_path / "full.ckpt"))
    assert "resume from the folder" in capsys.readouterr().out
    loaded = DINO.load_from_checkpoint(written)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match=r"not a sharded checkpoint folder .* needs no consolidation"):
        consolidate(str(written), str(tmp_path / "again.ckpt"))
