"""The package is organised by concern: no import cycle, lower rooms never import the method
modules, small files, and the public names of 0.1 still import from ``lightning_dino``."""

import ast
from pathlib import Path

import lightning_dino

PACKAGE = Path(lightning_dino.__file__).parent
METHODS = {"lightning_dino.dino", "lightning_dino.distillation", "lightning_dino.cli", "lightning_dino.tools"}
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
    assert sizes["dino.py"] < 400
    assert {name: n for name, n in sizes.items() if n > 700} == {}


def test_every_0_1_public_name_still_imports_from_the_package():
    assert PUBLIC_0_1 <= set(lightning_dino.__all__)
    for name in PUBLIC_0_1:
        assert getattr(lightning_dino, name) is not None
