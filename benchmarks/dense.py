"""Dense (patch-level) benchmark of the DINOv2 parts on Fashion-MNIST mosaics, at equal CPU time.

Protocol:

* Data. A mosaic is 56 x 56 px: four 28-px Fashion-MNIST items in a 2 x 2 grid, each item drawn
  from a uniformly random class (then a random item of that class). Training mosaics are built
  from the train split, test mosaics from the test split. With 4-px patches a mosaic is a
  14 x 14 patch grid, each quadrant 7 x 7 patches, so no patch straddles two items; every patch
  is labelled with the class of the item under it.
* Training. A ViT (4-px patches, 4 blocks of width 96, 3 heads) is trained with DINO multi-crop
  on the training mosaics: 2 global crops of 32 px at scale (0.25, 1) and 4 local crops of 16 px
  at scale (0.05, 0.25) of the 56-px mosaic (a global crop covers one to four items, a local
  crop at most about one), Fashion-MNIST augmentation as ``configs/fashion_mnist_vit.yaml``
  (blur sigma 0.1-0.5), batch 64, AdamW, cosine schedules over ``--schedule-steps``.
* Equal budget. Every variant trains from the same initial weights and data order until its
  process CPU time (``time.process_time()``, one thread, data augmentation included) reaches
  ``--budget-cpu-s`` (or the schedule ends), so other load on a shared machine does not change
  what a variant gets. ms/step is the median CPU time of one training iteration (batch
  augmentation, forward, backward, optimizer step, teacher update), the first step excluded.
* Variants. ``dino``; ``ibot`` = DINO + iBOT (weight 1, DINOv2's masking); ``ibot_koleo`` = +
  KoLeo 0.1; ``ibot_sk`` = + Sinkhorn-Knopp centring (DINO and iBOT targets); ``ibot_gram`` = +
  Gram anchoring (weight 1, Gram teacher taken at a third of the schedule and refreshed at two
  thirds). Each addition is on top of DINO + iBOT, not cumulative, so each is compared with one
  baseline. ``random_init`` evaluates the untrained network.
* Evaluation (teacher backbone, weighted k-NN of ``lightning_dino.eval.knn``: k=20, T=0.07,
  cosine). Patch level: the final patch tokens of training mosaics at 56 px form the bank
  (``--bank-mosaics`` mosaics, ``--bank-patches`` patches drawn at random from them), labelled
  with the class under each patch; the patch tokens of ``--test-mosaics`` test mosaics are the
  queries. Image level: the class token of plain 28-px items, ``--image-bank`` train items as
  the bank and ``--image-test`` test items as queries (DINO's k-NN protocol on subsets).
* Outputs. A markdown table on stdout, ``dense.csv`` and ``dense_pca.png`` in ``--out``: the
  first three principal components of the patch features of four test mosaics as RGB, for
  DINO and DINO + iBOT (PCA fitted per model over the four mosaics' patches).

Example:
    python benchmarks/dense.py --budget-cpu-s 480 --schedule-steps 640 --out docs  # docs/dinov2.md
    python benchmarks/dense.py --quick --out /tmp/dense  # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino import DINO
from lightning_dino.data.batched import BatchedMultiCropTransform
from lightning_dino.data.builtin_datasets import load_fashion_mnist
from lightning_dino.eval.knn import knn_accuracy
from lightning_dino.networks.tokens import token_forward

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ITEM = 28  # Fashion-MNIST side in pixels
PATCH = 4
N_CLASSES = 10
MEAN, STD = 0.286, 0.353  # Fashion-MNIST pixel statistics in [0, 1]
BACKBONE_KWARGS = {
    "img_size": 2 * ITEM,
    "patch_size": PATCH,
    "depth": 4,
    "embed_dim": 96,
    "num_heads": 3,
}
CROPS = {
    "global_crop_size": 32,
    "local_crop_size": 16,
    "n_local_crops": 4,
    "global_crop_scale": (0.25, 1.0),
    "local_crop_scale": (0.05, 0.25),
    "blur_sigma": (0.1, 0.5),
    "mean": (MEAN,) * 3,
    "std": (STD,) * 3,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "random_init": {},
    "dino": {},
    "ibot": {"ibot_loss_weight": 1.0},
    "ibot_koleo": {"ibot_loss_weight": 1.0, "koleo_loss_weight": 0.1},
    "ibot_sk": {"ibot_loss_weight": 1.0, "centering": "sinkhorn_knopp"},
    "ibot_gram": {"ibot_loss_weight": 1.0, "gram_loss_weight": 1.0},
}
LABELS = {
    "random_init": "random init (no training)",
    "dino": "DINO",
    "ibot": "DINO + iBOT",
    "ibot_koleo": "DINO + iBOT + KoLeo",
    "ibot_sk": "DINO + iBOT + Sinkhorn-Knopp",
    "ibot_gram": "DINO + iBOT + Gram anchoring",
}


@dataclass
class Sizes:
    """How much data each part of the benchmark uses."""

    train_mosaics: int
    batch_size: int
    bank_mosaics: int
    bank_patches: int
    test_mosaics: int
    image_bank: int
    image_test: int


FULL = Sizes(12800, 64, 1000, 20000, 200, 10000, 2000)
QUICK = Sizes(128, 16, 20, 1000, 4, 200, 100)


# Data ----------------------------------------------------------------------------------------


def make_mosaics(
    images: Tensor, labels: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """2 x 2 mosaics of items, each item of a uniformly random class.

    Args:
        images: uint8 items (N, S, S).
        labels: Their classes (N,), every one of ``0..C-1`` present.
        n: Number of mosaics.
        generator: Random generator (classes, then an item of each class).

    Returns:
        ``(mosaics, item_labels)``: uint8 (n, 1, 2S, 2S) and int64 (n, 2, 2), the class of the
        item in each quadrant (row, column).
    """
    counts = torch.bincount(labels)
    starts = counts.cumsum(0) - counts
    by_class = labels.argsort(stable=True)  # class c: by_class[starts[c] : starts[c] + counts[c]]
    item_labels = torch.randint(0, len(counts), (n, 2, 2), generator=generator)
    offsets = (torch.rand(n, 2, 2, generator=generator) * counts[item_labels]).long()
    items = images[by_class[starts[item_labels] + offsets]]  # (n, 2, 2, S, S)
    side = images.shape[-1]
    mosaics = items.permute(0, 1, 3, 2, 4).reshape(n, 1, 2 * side, 2 * side)
    return mosaics, item_labels


def patch_labels(item_labels: Tensor, grid: int) -> Tensor:
    """The class under each patch of a ``grid x grid`` patch map of 2 x 2 mosaics.

    Args:
        item_labels: Quadrant classes (n, 2, 2).
        grid: Patches per side, even (each quadrant is ``grid / 2`` patches wide).

    Returns:
        int64 (n, grid, grid): patch (r, c) has the class of quadrant (r // q, c // q).
    """
    if grid % 2:
        raise ValueError(f"a 2 x 2 mosaic needs an even patch grid, got {grid}")
    q = grid // 2
    return item_labels.repeat_interleave(q, dim=1).repeat_interleave(q, dim=2)


def normalise(images: Tensor) -> Tensor:
    """uint8 grey images (N, 1, H, W) -> normalised float (N, 3, H, W), as the crops are."""
    return ((images.float() / 255.0 - MEAN) / STD).expand(-1, 3, -1, -1)


# Training ------------------------------------------------------------------------------------


class CPUBudget(Callback):
    """Stops training once the process has used ``budget_s`` seconds of CPU time.

    Args:
        budget_s: CPU seconds (``time.process_time()``) the training may use.

    Attributes:
        step_times: CPU seconds of each training iteration (data, step, teacher update).
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.step_times: list[float] = []
        self._start = self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock."""
        self._start = self._last = time.process_time()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """Record the iteration's CPU time; stop when the budget is spent."""
        now = time.process_time()
        self.step_times.append(now - self._last)
        self._last = now
        if now - self._start >= self.budget_s:
            trainer.should_stop = True

    def ms_per_step(self) -> float:
        """Median CPU milliseconds of an iteration, the first (warm-up) one excluded."""
        times = self.step_times[1:] or self.step_times
        return 1000 * statistics.median(times) if times else float("nan")


def build_model(
    variant: str,
    schedule_steps: int,
    steps_per_epoch: int,
    backbone_kwargs: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DINO:
    """The DINO module of a variant (same architecture and recipe for all).

    Args:
        variant: A key of :data:`VARIANTS`.
        schedule_steps: Length of the cosine schedules (and of the Gram schedule).
        steps_per_epoch: Optimizer steps in one pass over the training mosaics.
        backbone_kwargs: The ViT's ``timm`` arguments; :data:`BACKBONE_KWARGS` when None.
        overrides: DINO arguments that replace the recipe's (a later phase's).

    Returns:
        The module, untrained.
    """
    extra = dict(VARIANTS[variant])
    if extra.get("gram_loss_weight"):
        extra |= {"gram_start_step": schedule_steps // 3, "gram_update_every": schedule_steps // 3}
    recipe = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": BACKBONE_KWARGS if backbone_kwargs is None else backbone_kwargs,
        "drop_path_rate": 0.0,
        "out_dim": 2048,
        "hidden_dim": 512,
        "bottleneck_dim": 128,
        "teacher_temp": 0.04,
        "momentum_teacher": 0.99,
        "lr": 0.003,
        "min_lr": 1e-5,
        "warmup_epochs": 0.1 * schedule_steps / steps_per_epoch,
        "freeze_last_layer": 0,
        "monitors": False,
    }
    return DINO(**{**recipe, **extra, **(overrides or {})})


def train_variant(
    model: pl.LightningModule,
    mosaics: Tensor,
    sizes: Sizes,
    budget_s: float,
    schedule_steps: int,
    seed: int,
    crops: dict[str, Any] | None = None,
    collate: Any = None,
) -> CPUBudget:
    """Train ``model`` on multi-crops of ``mosaics`` until the CPU budget or the schedule ends.

    Args:
        model: A DINO or Distillation module.
        mosaics: uint8 training mosaics (n, 1, H, W).
        sizes: Batch size and data sizes.
        budget_s: CPU seconds the training may use.
        schedule_steps: Maximum number of steps (the schedules' length).
        seed: Seed of the weights' randomness and the data order.
        crops: Multi-crop settings; :data:`CROPS` when None.
        collate: The loader's ``collate_fn``; ``crops``' batched augmentation when None.

    Returns:
        The budget callback, holding the per-iteration CPU times.
    """
    pl.seed_everything(seed, verbose=False)
    if collate is None:
        collate = BatchedMultiCropTransform(**(CROPS if crops is None else crops)).collate
    loader = DataLoader(
        TensorDataset(mosaics, torch.zeros(len(mosaics), dtype=torch.int64)),
        batch_size=sizes.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    budget = CPUBudget(budget_s)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=schedule_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        callbacks=[budget],
    )
    trainer.fit(model, loader)
    return budget


# Evaluation ----------------------------------------------------------------------------------


@torch.inference_mode()
def patch_features(backbone: nn.Module, mosaics: Tensor, batch_size: int = 100) -> Tensor:
    """Final patch tokens of a ViT backbone on whole mosaics.

    Args:
        backbone: A timm ViT.
        mosaics: uint8 (n, 1, H, W).
        batch_size: Mosaics per forward.

    Returns:
        (n, N, D) patch tokens, N = (H / patch) * (W / patch), row-major.
    """
    backbone.eval()
    chunks = [
        token_forward(backbone, normalise(mosaics[i : i + batch_size]))[1]
        for i in range(0, len(mosaics), batch_size)
    ]
    return torch.cat(chunks)[:, backbone.num_prefix_tokens :]


@torch.inference_mode()
def image_features(backbone: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    """Class-token features (the backbone's pooled output) of uint8 items (n, 1, S, S) -> (n, D)."""
    backbone.eval()
    return torch.cat(
        [backbone(normalise(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


@dataclass
class EvalData:
    """Everything the evaluation reads, built once for all variants."""

    bank_mosaics: Tensor  # uint8 (n, 1, 56, 56)
    bank_labels: Tensor  # (n * N,) class under each patch
    bank_rows: Tensor  # (bank_patches,) patches of the bank kept
    test_mosaics: Tensor
    test_labels: Tensor  # (m * N,)
    image_bank: tuple[Tensor, Tensor]  # uint8 (n, 1, 28, 28), labels (n,)
    image_test: tuple[Tensor, Tensor]


def evaluate(backbone: nn.Module, data: EvalData) -> tuple[float, float]:
    """Patch-level and image-level weighted k-NN top-1 of a backbone (k=20, T=0.07).

    Returns:
        ``(patch_top1, image_top1)`` in [0, 1].
    """
    bank = patch_features(backbone, data.bank_mosaics).flatten(0, 1)[data.bank_rows]
    queries = patch_features(backbone, data.test_mosaics).flatten(0, 1)
    patch_top1, _ = knn_accuracy(
        bank, data.bank_labels[data.bank_rows], queries, data.test_labels, num_classes=N_CLASSES
    )
    image_bank = image_features(backbone, data.image_bank[0])
    image_queries = image_features(backbone, data.image_test[0])
    image_top1, _ = knn_accuracy(
        image_bank, data.image_bank[1], image_queries, data.image_test[1], num_classes=N_CLASSES
    )
    return patch_top1, image_top1


def pca_rgb(features: Tensor) -> Tensor:
    """First three principal components of patch features as colours.

    Args:
        features: (n, h, w, D) patch features of n images, one PCA fitted over all of them.

    Returns:
        (n, h, w, 3) in [0, 1], each component min-max scaled over the n images.
    """
    flat = features.flatten(0, 2).float()
    flat = flat - flat.mean(dim=0)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    components = flat @ vh[:3].T
    low, high = components.min(dim=0).values, components.max(dim=0).values
    scaled = (components - low) / (high - low).clamp(min=1e-8)
    return scaled.reshape(*features.shape[:3], 3)


def save_pca_figure(mosaics: Tensor, features: dict[str, Tensor], path: Path) -> None:
    """Mosaics (top row) and the PCA colours of each variant's patch features (one row each).

    Args:
        mosaics: uint8 (n, 1, H, W).
        features: Variant label -> patch features (n, h, w, D).
        path: PNG to write.
    """
    n = len(mosaics)
    fig, axes = plt.subplots(1 + len(features), n, figsize=(2 * n, 2 * (1 + len(features))))
    rows = [("mosaic", mosaics[:, 0].float() / 255.0)]
    rows += [(label, pca_rgb(f)) for label, f in features.items()]
    for row, (label, pictures) in enumerate(rows):
        for col in range(n):
            ax = axes[row, col]
            ax.imshow(pictures[col], cmap="gray" if pictures.ndim == 3 else None)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label)
    fig.suptitle("PCA of teacher patch features (first 3 components as RGB), test mosaics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Driver --------------------------------------------------------------------------------------


def build_eval_data(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], sizes: Sizes, seed: int
) -> EvalData:
    """Bank and query mosaics and items for the evaluation (fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    grid = 2 * ITEM // PATCH
    bank, bank_items = make_mosaics(*train, sizes.bank_mosaics, gen)
    queries, query_items = make_mosaics(*test, sizes.test_mosaics, gen)
    bank_labels = patch_labels(bank_items, grid).flatten()
    rows = torch.randperm(len(bank_labels), generator=gen)[: sizes.bank_patches]
    image_bank = torch.randperm(len(train[1]), generator=gen)[: sizes.image_bank]
    image_test = torch.randperm(len(test[1]), generator=gen)[: sizes.image_test]
    return EvalData(
        bank_mosaics=bank,
        bank_labels=bank_labels,
        bank_rows=rows,
        test_mosaics=queries,
        test_labels=patch_labels(query_items, grid).flatten(),
        image_bank=(train[0][image_bank, None], train[1][image_bank]),
        image_test=(test[0][image_test, None], test[1][image_test]),
    )


def train_measured(
    model: pl.LightningModule,
    mosaics: Tensor,
    sizes: Sizes,
    budget_s: float,
    schedule_steps: int,
    seed: int,
    crops: dict[str, Any] | None = None,
    collate: Any = None,
) -> tuple[int, float, float]:
    """:func:`train_variant`, measured.

    Returns:
        ``(steps, CPU seconds of the whole training, median CPU ms of a step)``.
    """
    start = time.process_time()
    budget = train_variant(model, mosaics, sizes, budget_s, schedule_steps, seed, crops, collate)
    return model.trainer.global_step, time.process_time() - start, budget.ms_per_step()


def result_row(
    variant: str,
    backbone: nn.Module,
    data: EvalData,
    steps: int,
    cpu_s: float,
    ms: float,
    labels: dict[str, str],
) -> dict[str, Any]:
    """Evaluate ``backbone`` (see :func:`evaluate`); print and return the table row."""
    patch_top1, image_top1 = evaluate(backbone, data)
    row = {
        "variant": variant,
        "steps": steps,
        "train_cpu_s": round(cpu_s, 1),
        "ms_per_step": round(ms, 1),
        "patch_knn_top1": patch_top1,
        "image_knn_top1": image_top1,
    }
    print(f"{labels[variant]}: {row}", flush=True)
    return row


def run_variant(
    variant: str, mosaics: Tensor, data: EvalData, sizes: Sizes, args: argparse.Namespace
) -> tuple[dict[str, Any], Tensor]:
    """Train (unless ``random_init``) and evaluate one variant.

    Returns:
        The table row and the PCA mosaics' patch features (4, h, w, D).
    """
    steps_per_epoch = len(mosaics) // sizes.batch_size
    pl.seed_everything(args.seed, verbose=False)
    model = build_model(variant, args.schedule_steps, steps_per_epoch)
    run = (0, 0.0, float("nan"))
    if variant != "random_init":
        run = train_measured(
            model, mosaics, sizes, args.budget_cpu_s, args.schedule_steps, args.seed
        )
    backbone = model.teacher.backbone
    row = result_row(variant, backbone, data, *run, LABELS)
    grid = 2 * ITEM // PATCH
    pca = patch_features(backbone, data.test_mosaics[:4]).unflatten(1, (grid, grid))
    return row, pca


def markdown_table(rows: list[dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    """The results as a markdown table (accuracies in %), rows named by ``labels`` (LABELS)."""
    labels = LABELS if labels is None else labels
    lines = [
        "| variant | steps in budget | ms/step (CPU) | patch k-NN top-1 | image k-NN top-1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "-" if r["steps"] == 0 else f"{r['ms_per_step']:.0f}"
        lines.append(
            f"| {labels[r['variant']]} | {r['steps']} | {ms} | "
            f"{100 * r['patch_knn_top1']:.1f}% | {100 * r['image_knn_top1']:.1f}% |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The table rows as a CSV file (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def prepare_run(quick: bool, seed: int) -> tuple[Sizes, Tensor, EvalData]:
    """One CPU thread (budgets are CPU seconds), the sizes, the training mosaics and the eval data."""
    torch.set_num_threads(1)
    sizes = QUICK if quick else FULL
    return (sizes, *load_data(sizes, seed))


def load_data(sizes: Sizes, seed: int) -> tuple[Tensor, EvalData]:
    """The training mosaics and the evaluation data, both fixed by ``seed``."""
    train = load_fashion_mnist(None, train=True)
    test = load_fashion_mnist(None, train=False)
    data = build_eval_data(train, test, sizes, seed)
    mosaics, _ = make_mosaics(*train, sizes.train_mosaics, torch.Generator().manual_seed(seed))
    return mosaics, data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-cpu-s", type=float, default=480.0, help="CPU s per variant")
    parser.add_argument("--schedule-steps", type=int, default=640, help="cosine schedule length")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the outputs")
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 1 s budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_cpu_s, args.schedule_steps = min(args.budget_cpu_s, 1.0), 6
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print the table, write ``dense.csv`` and ``dense_pca.png``.

    Returns:
        The table rows.
    """
    args = parse_args(argv)
    sizes, mosaics, data = prepare_run(args.quick, args.seed)
    rows, pca = [], {}
    for variant in args.variants:
        row, pca[variant] = run_variant(variant, mosaics, data, sizes, args)
        rows.append(row)
    write_csv(rows, args.out / "dense.csv")
    shown = {LABELS[v]: pca[v] for v in ("dino", "ibot") if v in pca}
    if shown:
        save_pca_figure(data.test_mosaics[:4], shown, args.out / "dense_pca.png")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
