"""Run the notebooks in notebooks/ end to end with tiny settings, so they never rot.

Each notebook runs in a fresh kernel of this interpreter with ``LIGHTNING_DINO_SMOKE=1`` (the
notebooks' switch to tiny settings) and a temporary working directory, so the runs, exports and
demo images they write never land in the repository. The stored notebooks keep the outputs of a
full run (``python notebooks/execute.py``), which the tests here execute again, in memory.
"""

from __future__ import annotations

import importlib.util
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
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's package, as the tests import
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
def test_notebooks_are_stored_with_the_outputs_of_a_full_run(name):
    """Readers see each notebook's plots and numbers without running it.

    ``python notebooks/execute.py`` runs them with their full settings and stores the outputs;
    every code cell ran, in order, without an error.
    """
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{name}: not executed top to bottom in one kernel; run python notebooks/execute.py"
    )
    for cell in code:
        errors = [out for out in cell.outputs if out.output_type == "error"]
        assert not errors, f"{name}: cell {cell.get('id')} stored an error"
        text = "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")
        assert "LIGHTNING_DINO_SMOKE" not in text
        for machine_text in ("Warning", "/tmp/", "/work/", "/home/", "site-packages"):
            assert machine_text not in text, f"{name}: a stored output shows {machine_text!r}"
    images = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert images, f"{name}: no stored plot"


def test_stored_outputs_leave_out_the_machines_warnings_and_progress_redraws():
    spec = importlib.util.spec_from_file_location("execute", NOTEBOOKS / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    warning = "/x/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found\n  from .auto import tqdm\n"
    outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=warning),
        nbformat.v4.new_output("stream", name="stdout", text="GPU available: False, used: False\n"),
        nbformat.v4.new_output("stream", name="stderr", text="/x/_pytree.py:21: `LeafSpec` is deprecated\n"),
        nbformat.v4.new_output("stream", name="stdout", text="fit 10%|#\rfit 100%|##\ntop-1 85.0%\n"),
    ]
    dropped: list[str] = []
    tidied = execute.tidy_streams(outputs, dropped)
    assert [(output.name, output.text) for output in tidied] == [("stdout", "fit 100%|##\ntop-1 85.0%\n")]
    assert len(dropped) == 4 and "TqdmWarning" in dropped[0]
