"""Command-line tools of ``lightning-dino`` beside training: export, embed, knn, probe, attention.

Each function is a command; jsonargparse turns its typed arguments into flags
(``lightning-dino knn --ckpt RUN.ckpt --config configs/quickstart.yaml``) and its docstring into
``--help``. They are plain functions, so they are just as usable from Python or a notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from lightning_dino.data import EvalTransform, MultiCropDataModule, load_image
from lightning_dino.eval.attention import attention_maps, check_vit, save_attention_png
from lightning_dino.eval.knn import extract_features, knn_accuracy
from lightning_dino.eval.linear import fit_linear_probe
from lightning_dino.io.embed import embed_images
from lightning_dino.io.export import (
    eval_preprocessing,
    export_backbone,
    load_backbone,
    read_checkpoint,
)
from lightning_dino.networks.backbones import use_standard_pooling
from lightning_dino.recipes import resolve_config
from lightning_dino.setting_names import setting

Which = Literal["teacher", "student", "ema"]


def datamodule_from_config(config: str | Path | None, **overrides: Any) -> MultiCropDataModule:
    """Build the data module described by the ``data:`` section of a ``lightning-dino fit`` config.

    Args:
        config: A fit YAML config (its ``data:`` keys are ``MultiCropDataModule`` arguments), or
            None for the data module's defaults.
        **overrides: Data-module arguments that replace the config's (None values are ignored).

    Returns:
        The data module, already ``setup("fit")``.
    """
    data: dict[str, Any] = {}
    if config is not None:
        path = Path(resolve_config(str(config)))
        if not path.is_file():
            config_name = setting("datamodule_from_config", "config")
            raise FileNotFoundError(f"{config_name}: no such file: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        data = dict(loaded.get("data") or {})
        data = dict(data.get("init_args", data))
        data.pop("class_path", None)
    data.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("global_crop_scale", "local_crop_scale", "mean", "std", "color_jitter", "blur_p"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    module = MultiCropDataModule(**data)
    module.setup("fit")
    return module


def export(ckpt: Path, out: Path, which: Which | None = None) -> None:
    """Export the teacher (or student) backbone of a DINO checkpoint for plain timm.

    Args:
        ckpt: Lightning checkpoint of a DINO run (e.g. runs/dino/version_0/checkpoints/last.ckpt).
        out: Directory to write model.safetensors and config.json to.
        which: Network to export; by default the one the checkpoint evaluates: DINO's teacher
            (what DINO releases), a distillation run's EMA of its student.
    """
    export_backbone(ckpt, out, which)
    print(f"exported the {which or 'evaluated'} backbone of {ckpt} to {out}")


def embed(
    backbone: Path,
    images: Path,
    out: Path,
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    l2_normalize: bool = False,
) -> None:
    """Embed every image under a folder with a DINO backbone (export dir or checkpoint teacher).

    Args:
        backbone: An export directory or a .ckpt file (its teacher backbone is used).
        images: Folder of images, searched recursively.
        out: Output .safetensors file; image paths go to <out stem>.paths.json.
        image_size: Centre-crop size fed to the backbone (default: the training run's).
        resize: Resize before the crop (default: the training run's crop ratio).
        batch_size: Images per forward pass.
        num_workers: DataLoader workers.
        mean: Normalisation mean (default: the training run's).
        std: Normalisation std (default: the training run's).
        l2_normalize: Store L2-normalised embeddings.
    """
    path = embed_images(
        backbone,
        images,
        out,
        image_size=image_size,
        resize=resize,
        batch_size=batch_size,
        num_workers=num_workers,
        mean=mean,
        std=std,
        l2_normalize=l2_normalize,
    )
    print(f"wrote embeddings to {path}")


def knn(
    ckpt: Path,
    config: Path | None = None,
    k: int = 20,
    temperature: float = 0.07,
    which: Which | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    pooling: Literal["trained", "standard"] = "trained",
) -> tuple[float, float]:
    """Weighted k-NN accuracy of a checkpoint's backbone (the DINO protocol).

    The train split is the memory bank and the test split the queries, both with the data
    module's evaluation transform; features are L2-normalised, neighbours vote with exp(cos/T).

    Args:
        ckpt: DINO checkpoint (.ckpt) or export directory.
        config: The fit config whose data section names the dataset.
        k: Number of neighbours.
        temperature: Voting temperature T.
        which: Backbone to evaluate; by default the checkpoint's evaluated network (DINO's
            teacher, as in the paper; a distillation run's student EMA).
        batch_size: Evaluation batch size (default: the config's).
        num_workers: DataLoader workers (default: the config's).
        pooling: ``"trained"``: the features the run trained with (``feature_grid`` included);
            ``"standard"``: the paper's protocol, a CNN's global average pool or a ViT's class
            token, for a run trained with ``feature_grid``.

    Returns:
        (top1, top5) as fractions.
    """
    data = datamodule_from_config(config, eval_batch_size=batch_size, num_workers=num_workers)
    if not data.has_labels:
        raise ValueError(f"the dataset of {config} has no labels: k-NN needs labelled data")
    backbone = load_backbone(ckpt, which)
    if pooling == "standard":
        use_standard_pooling(backbone)
    bank = extract_features(backbone, data.knn_train_dataloader())
    queries = extract_features(backbone, data.knn_val_dataloader())
    top1, top5 = knn_accuracy(*bank, *queries, k=k, temperature=temperature)
    print(
        f"k-NN ({which or 'evaluated network'}, {pooling} pooling, k={k}, T={temperature}, "
        f"{len(bank[1])} train / {len(queries[1])} test): "
        f"top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%"
    )
    return top1, top5


def probe(
    ckpt: Path,
    config: Path | None = None,
    epochs: int = 100,
    lr: float = 0.001,
    which: Which | None = None,
    feature_mode: Literal["auto", "cls", "last4_cls", "pooled"] = "auto",
    batch_size: int | None = None,
    accelerator: str = "auto",
) -> dict[str, float]:
    """Linear probe on the frozen backbone of a checkpoint (reports best and last epoch top-1).

    SGD with momentum 0.9, no weight decay, cosine schedule, lr scaled by batch / 256. Images use
    the data module's evaluation transform (no augmentation), unlike the reference's random
    resized crops; say so when comparing numbers.

    Args:
        ckpt: DINO checkpoint (.ckpt) or export directory.
        config: The fit config whose data section names the dataset.
        epochs: Training epochs of the linear layer.
        lr: Base learning rate for a batch of 256.
        which: Backbone to probe.
        feature_mode: auto = CLS of the last 4 blocks for ViTs, pooled features otherwise.
        batch_size: Batch size (default: the config's).
        accelerator: Lightning accelerator.

    Returns:
        {"best_top1": ..., "last_top1": ...}.
    """
    data = datamodule_from_config(config, eval_batch_size=batch_size)
    result = fit_linear_probe(
        load_backbone(ckpt, which),
        data.knn_train_dataloader(),
        data.knn_val_dataloader(),
        num_classes=data.num_classes,
        epochs=epochs,
        lr=lr,
        feature_mode=feature_mode,
        accelerator=accelerator,
        progress=True,
    )
    print(
        f"linear probe ({which or 'evaluated network'}, {epochs} epochs): "
        f"best top-1 {100 * result['best_top1']:.2f}%  "
        f"last top-1 {100 * result['last_top1']:.2f}%"
    )
    return result


def attention(
    ckpt: Path,
    image: Path,
    out: Path,
    image_size: int | None = None,
    threshold: float | None = None,
    which: Which | None = None,
) -> Path:
    """Write a PNG of the last block's CLS attention maps, one per head, for one image.

    Args:
        ckpt: DINO checkpoint of a ViT run (.ckpt).
        image: The image file.
        out: Output PNG path.
        image_size: Square input size, rounded down to a multiple of the patch size (default:
            the run's evaluation size).
        threshold: Keep the smallest set of patches holding this fraction of each head's
            attention mass (0.6 in the paper); None shows the raw maps.
        which: Backbone to visualise.

    Returns:
        The PNG path.
    """
    preprocessing = eval_preprocessing(read_checkpoint(ckpt))
    mean, std = preprocessing["mean"], preprocessing["std"]
    vit = check_vit(load_backbone(ckpt, which))
    patch = vit.patch_embed.patch_size[0]
    size = image_size or preprocessing["size"] or 224
    size = max(patch, size // patch * patch)
    transform = EvalTransform(size=size, resize=size, mean=mean, std=std)
    tensor = transform(load_image(image))
    with torch.no_grad():
        maps = attention_maps(vit, tensor.unsqueeze(0), threshold=threshold)[0]
    path = save_attention_png(tensor, maps, out, mean=mean, std=std)
    heads, rows, cols = maps.shape
    print(f"wrote {heads} attention maps ({rows}x{cols} patches) to {path}")
    return path
