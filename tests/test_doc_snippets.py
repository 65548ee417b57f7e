"""The Python snippets of the README and of docs/ run, each page's blocks in order in one namespace.

Tiny settings, nothing else changed: the paths the pages invent (a folder of images, a teacher's
weights file, an export) are made here; ``lightning.pytorch.Trainer`` runs one CPU step in 32-bit
precision without logger or checkpoints; ``MultiCropDataModule`` reads batches of 2 with small crops
in the main process. The models are the ones the snippets name, at full size.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import lightning_dino
from lightning_dino import DINO, MultiCropDataModule, export_backbone

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    path.relative_to(REPO).as_posix()
    for path in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    if "```python" in path.read_text()
)
IMAGE_FOLDERS = ("/data/my_images", "/path/to/images")
TEACHER_FILE = "/models/dinov2_vits14/model.safetensors"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def page_code(page: str) -> str:
    return "\n".join(python_blocks((REPO / page).read_text()))


# a snippet repeated on several pages (the README's on getting_started.md) runs once, on the first
FIRST_PAGE_OF_CODE: dict[str, str] = {}
for _page in PAGES:
    FIRST_PAGE_OF_CODE.setdefault(page_code(_page), _page)
UNIQUE_PAGES = list(FIRST_PAGE_OF_CODE.values())


class OneStepTrainer(pl.Trainer):
    """The snippet's Trainer, cut to one step on the CPU."""

    def __init__(self, *args, **kwargs):
        kwargs.update(accelerator="cpu", devices=1, precision="32-true", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        super().__init__(*args, **kwargs)


class TinyBatches(MultiCropDataModule):
    """The snippet's data module with batches of 2 and small crops, read in the main process."""

    def __init__(self, *args, **kwargs):
        kwargs.update(batch_size=2, num_workers=0, global_crop_size=32, local_crop_size=16,
                      n_local_crops=min(kwargs.get("n_local_crops", 2), 2))
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder of images in two class folders, a teacher's weights file and an export."""
    root = tmp_path_factory.mktemp("snippets")
    generator = torch.Generator().manual_seed(0)
    for index in range(8):
        folder = root / "images" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    teacher = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=224)
    (root / "teacher").mkdir()
    save_file(teacher.state_dict(), root / "teacher" / "model.safetensors")
    model = DINO(backbone="vit_small_patch16_224", out_dim=64, hidden_dim=32, bottleneck_dim=16)
    trainer = OneStepTrainer(default_root_dir=root / "run")
    trainer.fit(model, TinyBatches(dataset="folder", data_dir=str(root / "images")))
    trainer.save_checkpoint(root / "run" / "last.ckpt")
    export_backbone(root / "run" / "last.ckpt", root / "exports" / "vits16")
    return root


def test_the_pages_with_snippets_are_found():
    assert {"README.md", "docs/distillation.md", "docs/own_project.md"} <= set(PAGES)


@pytest.mark.parametrize("page", UNIQUE_PAGES)
def test_the_python_snippets_of_a_page_run(page, workspace, monkeypatch):
    code = page_code(page)
    for folder in IMAGE_FOLDERS:
        code = code.replace(f'"{folder}"', repr(str(workspace / "images")))
    code = code.replace(f'"{TEACHER_FILE}"', repr(str(workspace / "teacher" / "model.safetensors")))
    monkeypatch.chdir(workspace)  # relative paths such as exports/vits16
    monkeypatch.setattr(pl, "Trainer", OneStepTrainer)
    monkeypatch.setattr(lightning_dino, "MultiCropDataModule", TinyBatches)
    namespace: dict = {"__name__": "snippet"}
    exec(compile(code, page, "exec"), namespace)  # the page's own code
    trainers = [value for value in namespace.values() if isinstance(value, pl.Trainer)]
    for trainer in trainers:
        assert trainer.global_step == 1, f"{page}: the snippet's trainer.fit did not train"
