"""Run every notebook here with its full settings and store its outputs, so readers see them.

    python notebooks/execute.py                 # both notebooks
    python notebooks/execute.py quickstart      # one of them

Each notebook runs in a fresh kernel of this interpreter, in a temporary working directory (the
runs, exports and demo images it writes stay out of the repository), and is written back with
its outputs. The test suite runs the same notebooks with tiny settings
(``tests/test_notebooks.py``); it checks that the stored outputs hold no error.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL_NAME = "lightning-dino-notebooks"
PROGRESS = re.compile(r"\d+%\|")  # a progress bar's line
# Lines of the execution machine, not of the notebook: warnings (and the source line Python prints
# under each), Lightning's hardware and advertising lines.
NOISE = re.compile(r"Warning: |^\S+\.py:\d+: |^\s+(from|import) |^(GPU|TPU|HPU) available|Tip: ")


def execute(name: str, cell_timeout_s: int) -> float:
    """Execute ``HERE/name.ipynb`` in place; returns the seconds it took."""
    path = HERE / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        jupyter_dir = Path(tmp) / "jupyter"
        write_kernel_spec(jupyter_dir / "kernels" / KERNEL_NAME)
        os.environ["JUPYTER_PATH"] = str(jupyter_dir)
        os.environ.pop("LIGHTNING_DINO_SMOKE", None)
        os.environ["PYTHONPATH"] = str(HERE.parent)  # this checkout's package
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        data = HERE.parent / "data"
        if data.is_dir():
            (workdir / "data").symlink_to(data, target_is_directory=True)
        start = time.perf_counter()
        NotebookClient(
            notebook,
            timeout=cell_timeout_s,
            kernel_name=KERNEL_NAME,
            resources={"metadata": {"path": str(workdir)}},
        ).execute()
        seconds = time.perf_counter() - start
    notebook.metadata.pop("widgets", None)
    dropped: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = tidy_streams(cell.outputs, dropped)
    for line in dict.fromkeys(dropped):  # once each, in order
        print(f"{name}: left out of the stored output: {line.strip()}")
    nbformat.write(notebook, path)
    return seconds


def tidy_streams(outputs: list, dropped: list[str]) -> list:
    """Merge consecutive stream outputs and keep each line's last progress-bar state.

    Progress bars redraw a line with carriage returns; stored as is, every redraw would show.
    Lines of the execution machine (``NOISE``) are left out of the stored output and appended to
    ``dropped``, for the person running this script to read.
    """
    tidied: list = []
    for output in outputs:
        if (
            output.output_type == "stream"
            and tidied
            and tidied[-1].output_type == "stream"
            and tidied[-1].name == output.name
        ):
            tidied[-1].text += output.text
        else:
            tidied.append(output)
    for output in tidied:
        if output.output_type == "stream":
            text = output.text.replace("\x1b[A", "")
            lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
            kept = []
            for line in lines:
                if NOISE.search(line):
                    dropped.append(line)
                elif line.strip() and (not PROGRESS.search(line) or "100%|" in line):
                    kept.append(line)
            output.text = "\n".join(kept) + "\n"
    return [output for output in tidied if output.output_type != "stream" or output.text.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["quickstart", "your_own_images"])
    parser.add_argument("--cell-timeout-s", type=int, default=3600)
    args = parser.parse_args()
    for name in args.names:
        print(f"{name}: {execute(name, args.cell_timeout_s):.0f} s")


if __name__ == "__main__":
    main()
