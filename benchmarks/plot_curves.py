"""Several k-NN curves of ``benchmarks/fashion_mnist.py`` in one figure, with reference lines.

Example:
    python benchmarks/plot_curves.py --out docs/distillation_knn_curve.png \
        --curve "distilled (features)=runs/bench_distil_features/curve.csv" \
        --curve "DINO from scratch=runs/bench_scratch/curve.csv" \
        --line "raw pixels=85.69"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """Training minutes and k-NN top-1 (%) of a ``curve.csv``."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [float(r["minutes"]) for r in rows], [100 * float(r["top1"]) for r in rows]


def main(argv: list[str] | None = None) -> None:
    """Parse ``--curve LABEL=CSV`` and ``--line LABEL=PERCENT`` pairs and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", action="append", default=[], help="LABEL=path/to/curve.csv")
    parser.add_argument("--line", action="append", default=[], help="LABEL=top-1 in percent")
    parser.add_argument("--title", default="Fashion-MNIST, weighted k-NN (k=20, T=0.07)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--ymin", type=float, default=75.0, help="bottom of the k-NN axis (%%)")
    parser.add_argument("--xlabel", default="training minutes (2-core CPU, evaluation excluded)")
    args = parser.parse_args(argv)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for item in args.curve:
        label, path = item.split("=", 1)
        minutes, top1 = read_curve(Path(path))
        ax.plot(minutes, top1, "o-", label=label)
    for item in args.line:
        label, value = item.split("=", 1)
        ax.axhline(float(value), ls="--", color="gray", lw=1)
        ax.annotate(f"{label} ({float(value):.1f}%)", (0, float(value)), va="bottom", fontsize=8)
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_ylim(bottom=args.ymin)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
