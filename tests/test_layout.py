"""The package is organised by concern: no import cycle, lower rooms never import the method
modules, small files, test files that mirror the package's, and the public names of 0.1 still
import from ``lightning_dino``."""

import ast
from pathlib import Path

import lightning_dino

PACKAGE = Path(lightning_dino.__file__).parent
METHODS = {"lightning_dino.dino", "lightning_dino.distillation", "lightning_dino.distillation_objectives",
           "lightning_dino.cli", "lightning_dino.commands"}
ROOMS = ("losses", "networks", "training", "data", "eval", "io")
# Every name lightning_dino exported in 0.1.0.
PUBLIC_0_1 = {
    "DINO", "AttentionMapMonitor", "CollapseMonitor", "CropGridLogger", "DINOCheckpoint", "DINOHead",
    "DINOLoss", "EpochSampler", "GramLoss", "KNNMonitor", "KoLeoLoss", "LinearProbe", "MultiCropDataModule",
    "MultiCropTransform", "RandomStateCallback", "ResumableDataLoader", "StepScheduler", "TeacherEMA",
    "ThroughputLogger", "TrainingInterrupted", "__version__", "attention_maps", "collapse_statistics",
    "ema_update", "embed_images", "export_backbone", "iBOTPatchLoss", "knn_accuracy", "load_backbone",
    "load_embeddings", "prepare_streaming_dataset", "sinkhorn_knopp",
}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """Every lightning_dino module a file imports, at any level (functions, TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_dino"):
            found.add(node.module)
            for alias in node.names:  # `from lightning_dino.losses import dino` imports a module
                if (PACKAGE.parent / (node.module + "." + alias.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_dino")}
    return found


def graph():
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        targets = set()
        for target in imports_of(path):
            targets.add(target)
            # Importing a.b.c runs the package a.b first, unless this module is inside it.
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if not name.startswith(parent + ".") and name != parent:
                    targets.add(parent)
        edges[name] = targets - {name}
    return edges


def test_no_import_cycle():
    edges = graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(target):], target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_lower_rooms_never_import_the_method_modules_or_the_package_root():
    for name, targets in graph().items():
        if name.split(".")[1:2] and name.split(".")[1] in ROOMS:
            assert not targets & METHODS, (name, targets & METHODS)
            assert "lightning_dino" not in targets, name


def test_the_graph_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lightning_dino.dino import DINO\n")
    assert imports_of(source) == {"lightning_dino.dino"}


def test_files_stay_small():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert sizes["dino.py"] <= 350 and sizes["distillation.py"] <= 350
    assert {name: n for name, n in sizes.items() if n > 600} == {}


# Modules whose tests are a topic file rather than their mirror (each module, the file that tests it).
COVERED_BY = {
    "__main__.py": "tests/test_cli.py",
    "extras.py": "tests/test_packaging.py",
    "recipes.py": "tests/test_packaging.py",
    "version.py": "tests/test_packaging.py",
    "seeding.py": "tests/data/test_data_rank_streams.py",
    "data/blur.py": "tests/data/test_data_transforms.py",
    "data/color.py": "tests/data/test_data_transforms.py",
    "data/sampler.py": "tests/data/test_data_datamodule.py",
    "data/splits.py": "tests/data/test_data_datamodule.py",
    "data/prepared/files.py": "tests/data/test_data_prepared_streaming.py",
    "data/prepared/split.py": "tests/data/test_data_prepared_streaming.py",
    "data/prepared/writer.py": "tests/data/test_data_prepared_streaming.py",
    "io/frozen_teacher.py": "tests/test_distillation.py",
    "losses/center.py": "tests/losses/test_losses_dino.py",
    "losses/precision.py": "tests/losses/test_losses_dino.py",
    "losses/ibot.py": "tests/losses/test_losses_dinov2.py",
    "losses/koleo.py": "tests/losses/test_losses_dinov2.py",
    "losses/sinkhorn_knopp.py": "tests/losses/test_losses_dinov2.py",
    "networks/backbones.py": "tests/networks/test_networks_grid_pool.py",
    "networks/distillation.py": "tests/test_distillation.py",
    "networks/forward.py": "tests/test_ibot_training.py",
    "networks/masking.py": "tests/losses/test_losses_dinov2.py",
    "training/callbacks.py": "tests/test_lifecycle.py",
    "training/checkpointing.py": "tests/training/test_training_faults.py",
    "training/optimization.py": "tests/training/test_training_schedules.py",
    "training/preemption.py": "tests/training/test_training_faults.py",
    "training/preflight.py": "tests/test_bad_input.py",
    "training/step_logging.py": "tests/training/test_training_monitors.py",
}


def mirror(module):
    """tests/<room>/test_<room>[_<sub>]_<name>.py for lightning_dino/<room>/[<sub>/]<name>.py;
    tests/test_<name>.py for a top-level module."""
    parts = module.removesuffix(".py").split("/")
    if len(parts) == 1:
        return f"tests/test_{parts[0]}.py"
    return f"tests/{parts[0]}/test_{'_'.join(parts)}.py"


def test_test_files_mirror_the_package_files():
    root = PACKAGE.parent
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    unmirrored = {m for m in modules if not (root / mirror(m)).exists()}
    assert unmirrored == set(COVERED_BY), "a new module needs tests/<room>/test_<room>_<name>.py"
    for module, test_file in COVERED_BY.items():
        assert (root / test_file).exists(), f"{module}: {test_file}"
    for room in ROOMS:  # a room's test files are named after it
        for path in (root / "tests" / room).glob("test_*.py"):
            assert path.name.startswith(f"test_{room}_"), path


def test_every_0_1_public_name_still_imports_from_the_package():
    assert PUBLIC_0_1 <= set(lightning_dino.__all__)
    for name in PUBLIC_0_1:
        assert getattr(lightning_dino, name) is not None
