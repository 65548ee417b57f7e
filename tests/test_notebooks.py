"""Run the notebooks in notebooks/ end to end with tiny settings, so they never rot.

Each notebook runs in a fresh kernel of this interpreter with ``LIGHTNING_DINO_SMOKE=1`` (the
notebooks' switch to tiny settings) and a temporary working directory, so the runs, exports and
demo images they write never land in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

from lightning_dino.data import load_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL_NAME = "lightning-dino-test"
CELL_TIMEOUT_S = 120


def _fashion_mnist_missing() -> bool:
    """True when neither Debian's package nor the repo's data/ dir has the Fashion-MNIST files."""
    try:
        load_fashion_mnist(REPO / "data", train=False)
    except FileNotFoundError:
        return True
    return False


def run_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute ``notebooks/<name>`` in a temporary directory; raises on the first failing cell."""
    # A kernel spec for this very interpreter: a user's own "python3" spec could point elsewhere.
    jupyter_dir = tmp_path / "jupyter"
    write_kernel_spec(jupyter_dir / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("LIGHTNING_DINO_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    data = REPO / "data"
    if data.is_dir():  # Fashion-MNIST downloaded by `make quickstart` outside Debian
        (workdir / "data").symlink_to(data, target_is_directory=True)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # CellExecutionError names the cell and shows its traceback
    for cell in notebook.cells:
        if cell.cell_type == "code":
            errors = [out for out in cell.outputs if out.output_type == "error"]
            assert not errors, f"{name}: cell {cell.get('id')} errored: {errors}"


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    if _fashion_mnist_missing():
        pytest.skip(
            "Fashion-MNIST idx files not found in /usr/share/datasets/fashion-mnist or data/ "
            "(apt-get install dataset-fashion-mnist, or `make fashion-mnist`)"
        )
    run_notebook("quickstart.ipynb", tmp_path, monkeypatch)


@pytest.mark.slow
def test_your_own_images_notebook(tmp_path, monkeypatch):
    run_notebook("your_own_images.ipynb", tmp_path, monkeypatch)
    assert (tmp_path / "work" / "exports" / "your_own_images" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["quickstart.ipynb", "your_own_images.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {cell.get('id')} has stored outputs"
            assert cell.execution_count is None, f"{name}: cell {cell.get('id')} has a count"
