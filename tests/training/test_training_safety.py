"""Checkpoints are read with `weights_only=True` everywhere, so loading one never runs code."""

import ast
import pickle
import sys
from pathlib import Path

import pytest
import torch

import lightning_dino
from lightning_dino import DINO
from lightning_dino.cli import main
from lightning_dino.io.export import read_checkpoint
from tests.conftest import TINY_VIT, CropData, make_trainer

PACKAGE = Path(lightning_dino.__file__).parent
CONF = Path(__file__).parents[1] / "conf"


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = f"{getattr(node.func.value, 'id', '?')}.{node.func.attr}"
                if name in ("pickle.load", "pickle.loads", "dill.load", "yaml.load"):
                    pytest.fail(f"{path}: {name} can run code from the file it reads")
                if name == "torch.load":
                    flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                    assert flags.get("weights_only") is True, f"{path}:{node.lineno} torch.load without weights_only=True"
                    calls.append(path.name)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("eval", "exec"):
                pytest.fail(f"{path}:{node.lineno} calls {node.func.id}")
    assert "export.py" in calls


def assert_same_weights(loaded, state_dict):
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state_dict[name]), name


def test_cli_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-dino"])
    main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--trainer.limit_train_batches=1",
          "--trainer.logger=false", "--checkpoint.dirpath=ckpts"])
    path = tmp_path / "ckpts" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # every entry, our callbacks' states included
    assert "RandomStateCallback" in checkpoint["callbacks"]
    model = DINO.load_from_checkpoint(path)  # torch's default weights_only=True
    assert model.hparams.backbone == "vit_tiny_patch16_224"
    assert_same_weights(model, checkpoint["state_dict"])


def test_python_built_module_with_a_timm_name_loads_with_weights_only(tmp_path):
    model = DINO(**TINY_VIT)
    trainer = make_trainer(max_steps=1)
    trainer.fit(model, CropData())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = DINO.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert_same_weights(loaded, model.state_dict())


class Payload:
    """Unpickling this object would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def booby_trapped(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "global_step": 0, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the trap is real: unrestricted unpickling runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_loading_a_checkpoint_never_runs_its_code(booby_trapped, monkeypatch, tmp_path):
    path, marker = booby_trapped
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-dino"])
    with pytest.raises(pickle.UnpicklingError):
        DINO.load_from_checkpoint(path)
    with pytest.raises(ValueError, match="refuses to run") as error:
        read_checkpoint(path)  # lightning-dino export / embed / knn ...
    assert "weights_only=False" not in str(error.value)  # never the advice to unpickle code
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "tiny_vit.yaml"), "--ckpt_path", str(path)])
    assert f"{path} is not a readable checkpoint" in str(exit_info.value.code)
    with pytest.raises(pickle.UnpicklingError):
        make_trainer(max_steps=1).fit(DINO(**TINY_VIT), CropData(), ckpt_path=path)
    assert not marker.exists()
