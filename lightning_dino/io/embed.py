"""Embed a folder of images with a DINO backbone and save the features as safetensors.

The output is ``<out>.safetensors`` holding one float32 tensor ``embeddings`` of shape
(N, D), and a sidecar ``<out>.paths.json`` with the N image paths, in the same order, relative
to the image folder. Images go through DINO's evaluation transform (bicubic resize of the
shorter side to ``round(image_size / 0.875)``, center crop, 3-channel RGB, normalisation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightning_dino.data.crops import IMAGENET_MEAN, IMAGENET_STD
from lightning_dino.data.image_folders import find_image_files, load_image
from lightning_dino.data.transforms import EvalTransform
from lightning_dino.io.export import CONFIG_NAME, eval_preprocessing, load_backbone, read_checkpoint
from lightning_dino.io.sharded_checkpoints import is_sharded_checkpoint

EMBEDDINGS_KEY = "embeddings"

# (dataset indices, images (B, 3, H, W) or None when every file failed, failed indices).
_Batch = tuple[list[int], Tensor | None, list[int]]


def embed_images(
    backbone_or_path: nn.Module | str | Path,
    image_dir: str | Path,
    out_file: str | Path,
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    l2_normalize: bool = False,
    device: str | None = None,
) -> Path:
    """Compute backbone features for every image under a folder (recursively).

    Files are found as :class:`lightning_dino.data.ImageFolderDataset` finds them (common image
    extensions in any case, hidden files ignored, sorted, folders walked recursively) and
    decoded to RGB the same way; files that cannot be decoded are skipped with one warning
    naming them all.

    Args:
        backbone_or_path: A module mapping (B, 3, H, W) to (B, D), or a path that
            :func:`lightning_dino.io.export.load_backbone` accepts (export directory or ``.ckpt``,
            whose teacher is used).
        image_dir: Folder to search for images.
        out_file: Output ``.safetensors`` file; the paths go to ``<out_file stem>.paths.json``.
        image_size: Side of the center crop fed to the backbone, in pixels; None takes the
            export's (or checkpoint's) evaluation size, else 224.
        resize: Shorter side after resizing; None takes the export's crop ratio, else
            ``round(image_size / 0.875)``.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        mean: Per-channel normalisation mean, for images in [0, 1]; None takes the training
            run's (from the export or checkpoint), else ImageNet's.
        std: Per-channel normalisation std; None as for ``mean``.
        l2_normalize: Scale each embedding to unit L2 norm (for cosine similarity / k-NN).
        device: Where to run the backbone; None for the module's own device (a loaded path:
            CUDA when available, else CPU).

    Returns:
        ``out_file`` as a Path.

    Raises:
        FileNotFoundError: If ``image_dir`` is missing or holds no image files.
        ValueError: If no image could be decoded or the backbone does not return (B, D).

    Examples:
        >>> embed_images("exports/vits16", "photos/", "photos.safetensors")  # doctest: +SKIP
        PosixPath('photos.safetensors')
    """
    image_dir, out_file = Path(image_dir), Path(out_file)
    files = [Path(path) for path, _ in find_image_files(image_dir)]
    backbone = _as_backbone(backbone_or_path)
    run_device = torch.device(device) if device else _default_device(backbone_or_path)
    transform = _eval_transform(backbone_or_path, image_size, resize, mean, std)
    dataset = _ImageFiles(files, transform)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    embeddings, kept, failed = _run(backbone.to(run_device), loader, run_device)
    if failed:
        rank_zero_warn(_skipped_message([files[i] for i in failed], image_dir))
    if not kept:
        raise ValueError(f"none of the {len(files)} image files under {image_dir} could be read")
    if l2_normalize:
        embeddings = nn.functional.normalize(embeddings, dim=1)
    paths = [files[i].relative_to(image_dir).as_posix() for i in kept]
    _save(embeddings, paths, image_dir, out_file)
    rank_zero_info(
        f"Embedded {len(paths)} images from {image_dir} into {embeddings.shape[1]}-d features "
        f"-> {out_file} (paths: {paths_file(out_file)})"
    )
    return out_file


def _eval_transform(
    backbone_or_path: nn.Module | str | Path,
    image_size: int | None,
    resize: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> EvalTransform:
    """The evaluation transform, filling unset values from the export's ``pretrained_cfg``."""
    cfg = _training_preprocessing(backbone_or_path)
    if image_size is None:
        image_size = int(cfg["input_size"][-1]) if "input_size" in cfg else 224
        if resize is None and "crop_pct" in cfg:
            resize = round(image_size / cfg["crop_pct"])
    return EvalTransform(
        image_size,
        resize,
        tuple(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN)),
        tuple(std if std is not None else cfg.get("std", IMAGENET_STD)),
    )


def _training_preprocessing(backbone_or_path: nn.Module | str | Path) -> dict[str, Any]:
    """``pretrained_cfg`` of an export directory or of the export a checkpoint would give."""
    if isinstance(backbone_or_path, nn.Module):
        return {}
    path = Path(backbone_or_path)
    config = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if config.is_file():
        return dict(json.loads(config.read_text()).get("pretrained_cfg") or {})
    if path.suffix == ".ckpt" and (path.is_file() or is_sharded_checkpoint(path)):
        data = eval_preprocessing(read_checkpoint(path))
        cfg: dict[str, Any] = {"mean": data["mean"], "std": data["std"]}
        if data["size"]:
            cfg["input_size"] = [3, data["size"], data["size"]]
            if data["resize"]:
                cfg["crop_pct"] = data["size"] / data["resize"]
        return cfg
    return {}


def load_embeddings(file: str | Path) -> tuple[Tensor, list[str]]:
    """Read embeddings written by :func:`embed_images`.

    Args:
        file: The ``.safetensors`` file.

    Returns:
        ``(embeddings, paths)``: a float32 tensor (N, D) and the N image paths relative to the
        embedded folder, in the same order.

    Examples:
        >>> embeddings, paths = load_embeddings("photos.safetensors")  # doctest: +SKIP
    """
    file = Path(file)
    embeddings = load_file(str(file))[EMBEDDINGS_KEY]
    paths = json.loads(paths_file(file).read_text())["paths"]
    return embeddings, paths


def paths_file(out_file: str | Path) -> Path:
    """The sidecar JSON holding the image paths of an embeddings file.

    Args:
        out_file: The embeddings file, e.g. ``feats.safetensors``.

    Returns:
        ``feats.paths.json`` next to it.
    """
    return Path(out_file).with_suffix(".paths.json")


class _ImageFiles(Dataset):
    """Decoded, transformed images with their index; None for a file that cannot be read."""

    def __init__(self, files: list[Path], transform: EvalTransform) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None]:
        try:
            image = load_image(self.files[index])
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            return index, None
        return index, self.transform(image)


def _collate(items: list[tuple[int, Tensor | None]]) -> _Batch:
    """Stack the readable images of a batch and list the unreadable ones."""
    ok = [(index, image) for index, image in items if image is not None]
    failed = [index for index, image in items if image is None]
    images = torch.stack([image for _, image in ok]) if ok else None
    return [index for index, _ in ok], images, failed


@torch.inference_mode()
def _run(
    backbone: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[Tensor, list[int], list[int]]:
    """Embed every batch in eval mode; the module's training flag is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    chunks, kept, failed = [], [], []
    for indices, images, bad in tqdm(loader, desc="embed", unit="batch"):
        failed += bad
        if images is None:
            continue
        features = backbone(images.to(device))
        if features.ndim != 2:
            raise ValueError(
                f"the backbone must return (B, D) features, got shape {tuple(features.shape)}; "
                "use a timm model with num_classes=0"
            )
        chunks.append(features.float().cpu())
        kept += indices
    backbone.train(was_training)
    return (torch.cat(chunks) if chunks else torch.empty(0, 0)), kept, failed


def _as_backbone(backbone_or_path: nn.Module | str | Path) -> nn.Module:
    """The module itself, or the teacher backbone loaded from an export or checkpoint."""
    if isinstance(backbone_or_path, nn.Module):
        return backbone_or_path
    return load_backbone(backbone_or_path)


def _default_device(backbone_or_path: nn.Module | str | Path) -> torch.device:
    """A given module stays where it is; a loaded one goes to CUDA when available."""
    if isinstance(backbone_or_path, nn.Module):
        param = next(backbone_or_path.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _skipped_message(skipped: list[Path], image_dir: Path) -> str:
    """One warning naming every unreadable file (the first 20, then a count)."""
    names = [p.relative_to(image_dir).as_posix() for p in skipped]
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"skipped {len(names)} unreadable image file(s) under {image_dir}: {shown}"


def _save(embeddings: Tensor, paths: list[str], image_dir: Path, out_file: Path) -> None:
    """Write the embeddings and their sidecar path list."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "image_dir": str(image_dir.resolve()), "count": str(len(paths))}
    save_file({EMBEDDINGS_KEY: embeddings.contiguous()}, str(out_file), metadata=metadata)
    sidecar = {"image_dir": str(image_dir.resolve()), "paths": paths}
    paths_file(out_file).write_text(json.dumps(sidecar, indent=1) + "\n")
