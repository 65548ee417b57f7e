"""Plant known DINO bugs one at a time in a copy of the repository and see which tests catch them.

For every bug the repository (package, tests, configs...; not ``.venv``, ``runs``, ``.git``) is
copied into a fresh temporary directory, one exact string replacement plants the bug in the
copy's source (the script stops if the pattern is not found exactly once: the source moved on,
update the pattern), and each chosen test file runs in the copy with this Python
(``python -m pytest -q -x -p no:cacheprovider FILE``, ``PYTHONPATH`` = the copy). The unmodified
copy runs first: every file must pass there, or the table would mean nothing.

The table lists, for each bug, the test files that failed, or ``NOT CAUGHT``.

Examples:
    python benchmarks/mutation_check.py
    python benchmarks/mutation_check.py --bugs ema_removed momentum_off_by_one \
        --tests tests/test_reference_parity.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = [
    "tests/test_reference_parity.py",
    "tests/training/test_training_ema.py",
    "tests/test_dino.py",
    "tests/losses/test_losses_dino.py",
]
# Not copied: names at the repository root only (tests/data and lightning_dino/data are code).
SKIP_AT_ROOT = {".venv", "runs", ".git", "data", "lightning_logs", ".whl"}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}


@dataclass(frozen=True)
class Bug:
    """One planted bug: replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    description: str
    path: str
    old: str
    new: str


BUGS: dict[str, Bug] = {
    "ema_removed": Bug(
        "(a) teacher EMA removed (TeacherEMA never calls ema_update)",
        "lightning_dino/training/ema.py",
        "        ema_update(target, pl_module.student, m)\n",
        "        pass  # planted bug: no EMA\n",
    ),
    "momentum_off_by_one": Bug(
        "(b) teacher momentum indexed by step instead of step - 1",
        "lightning_dino/training/ema.py",
        "m = self.momentum(step - 1, self._total_steps)",
        "m = self.momentum(step, self._total_steps)",
    ),
    "centre_before_loss": Bug(
        "(c) centre updated with this batch before the loss is computed",
        "lightning_dino/losses/dino.py",
        "            loss, teacher_raw = self._pairwise_cross_entropy(student_out, teacher_out, teacher_temp)\n"
        "            if self.training and self.centering == \"center\":\n"
        "                self.accumulate_center(teacher_raw)\n"
        "                if not self.defer_center_update:\n"
        "                    self.update_center()\n",
        "            if self.training:  # planted bug: the centre moves before the loss\n"
        "                self.accumulate_center(teacher_out)\n"
        "                self.update_center()\n"
        "            loss, teacher_raw = self._pairwise_cross_entropy(student_out, teacher_out, teacher_temp)\n",
    ),
    "decay_on_biases": Bug(
        "(d) weight decay applied to biases (parameter_groups)",
        "lightning_dino/training/optimization.py",
        'decays = not (name.endswith(".bias") or param.ndim == 1)',
        'decays = not (param.ndim == 1 and not name.endswith(".bias"))  # planted bug: biases decay',
    ),
    "global_clip": Bug(
        "(e) global-norm clip instead of per-tensor",
        "lightning_dino/training/optimization.py",
        "clip_gradients_per_tensor(list(self.student.parameters()), self.hparams.clip_grad)",
        "torch.nn.utils.clip_grad_norm_(list(self.student.parameters()), self.hparams.clip_grad)",
    ),
    "freeze_one_epoch_too_long": Bug(
        "(f) last layer frozen one epoch too long (< -> <=)",
        "lightning_dino/dino.py",
        "if self.current_epoch < self.hparams.freeze_last_layer:",
        "if self.current_epoch <= self.hparams.freeze_last_layer:",
    ),
    # Extra (not planted by default; choose them with --bugs).
    "teacher_forward_with_grad": Bug(
        "(x1) teacher called without no_grad in the step's forward",
        "lightning_dino/networks/forward.py",
        "    with torch.no_grad():\n        teacher_out = teacher(crops[:n_global])\n",
        "    if True:  # planted bug: autograd on\n        teacher_out = teacher(crops[:n_global])\n",
    ),
    "teacher_requires_grad": Bug(
        "(x2) teacher parameters left trainable",
        "lightning_dino/networks/backbones.py",
        "    teacher.requires_grad_(False)\n",
        "    pass  # planted bug: teacher.requires_grad_(False) dropped\n",
    ),
}
DEFAULT_BUGS = [
    "ema_removed",
    "momentum_off_by_one",
    "centre_before_loss",
    "decay_on_biases",
    "global_clip",
    "freeze_one_epoch_too_long",
]


def copy_repository(destination: Path) -> None:
    """Copy the repository at ``ROOT`` to ``destination`` without environments, runs and git."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        at_root = Path(directory).resolve() == ROOT
        skipped = {n for n in names if n in SKIP_ANYWHERE or n.endswith(".egg-info")}
        if at_root:
            skipped |= {n for n in names if n in SKIP_AT_ROOT}
        return skipped

    shutil.copytree(ROOT, destination, ignore=ignore)


def plant(repo: Path, bug: Bug) -> None:
    """Apply ``bug`` to the copy at ``repo``; exit if its pattern is not there exactly once."""
    path = repo / bug.path
    source = path.read_text()
    count = source.count(bug.old)
    if count != 1:
        sys.exit(
            f"pattern for {bug.description!r} found {count} times in {bug.path} (expected once); "
            f"the source changed, update the pattern in {Path(__file__).name}:\n{bug.old}"
        )
    path.write_text(source.replace(bug.old, bug.new))


def environment(repo: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_copy(repo: Path) -> None:
    """Make sure the copy's package, not the installed (editable) one, is what the tests import."""
    out = subprocess.run(
        [sys.executable, "-c", "import lightning_dino; print(lightning_dino.__file__)"],
        cwd=repo, env=environment(repo), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(repo.resolve()):
        sys.exit(f"the tests would import {out}, not the copy in {repo}")


def run_tests(repo: Path, tests: list[str], timeout: float) -> dict[str, tuple[bool, str]]:
    """Run each test file on its own; return {file: (passed, last line of pytest's output)}."""
    results = {}
    for test in tests:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                cwd=repo, env=environment(repo), capture_output=True, text=True, timeout=timeout,
            )
            lines = [line for line in proc.stdout.splitlines() if line.strip()]
            summary = lines[-1] if lines else proc.stderr.strip()[-200:]
            passed = proc.returncode == 0
            if not passed:  # the first error line says why (an assertion, or a crash)
                reason = next((line for line in lines if line.startswith("E ")), "")
                summary = f"{summary} | {reason[:160]}"
        except subprocess.TimeoutExpired:
            passed, summary = False, f"timed out after {timeout:.0f}s"
        results[test] = (passed, summary)
        print(f"    {test}: {'pass' if passed else 'FAIL'} ({time.perf_counter() - start:.0f}s) {summary}",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files, relative to the repository")
    parser.add_argument("--bugs", nargs="+", default=DEFAULT_BUGS, choices=list(BUGS), help="bugs to plant")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test file")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unmodified copy first")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        if not args.skip_baseline:
            print("baseline (no bug):", flush=True)
            repo = Path(tmp) / "baseline"
            copy_repository(repo)
            check_imports_copy(repo)
            failing = [t for t, (ok, _) in run_tests(repo, args.tests, args.timeout).items() if not ok]
            if failing:
                sys.exit(f"the unmodified repository fails {failing}: fix that first")
        table = []
        for key in args.bugs:
            bug = BUGS[key]
            print(f"{key}: {bug.description}", flush=True)
            repo = Path(tmp) / key
            copy_repository(repo)
            plant(repo, bug)
            check_imports_copy(repo)
            failed = [t for t, (ok, _) in run_tests(repo, args.tests, args.timeout).items() if not ok]
            table.append((bug.description, ", ".join(Path(t).name for t in failed) or "NOT CAUGHT"))

    width = max(len(d) for d, _ in table)
    print(f"\n{'bug':{width}s} | failing test files")
    print(f"{'-' * width}-|-{'-' * 40}")
    for description, caught in table:
        print(f"{description:{width}s} | {caught}")
    if any(caught == "NOT CAUGHT" for _, caught in table):
        sys.exit(1)


if __name__ == "__main__":
    main()
