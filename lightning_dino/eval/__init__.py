"""Evaluation of DINO backbones: weighted k-NN, linear probe, attention maps, collapse diagnostics.

Every protocol uses the *teacher* backbone's output (final-norm CLS for a ViT), as the paper does.
"""

from lightning_dino.eval.attention import (
    AttentionMapMonitor,
    attention_grid,
    attention_maps,
    attention_mass_mask,
    check_vit,
    save_attention_png,
)
from lightning_dino.eval.diagnostics import CollapseMonitor, collapse_statistics
from lightning_dino.eval.knn import (
    KNNMonitor,
    evaluated_backbone,
    extract_features,
    knn_accuracy,
    knn_predict,
)
from lightning_dino.eval.linear import LinearProbe, fit_linear_probe, probe_features

__all__ = [
    "AttentionMapMonitor",
    "CollapseMonitor",
    "KNNMonitor",
    "LinearProbe",
    "attention_grid",
    "attention_maps",
    "attention_mass_mask",
    "check_vit",
    "collapse_statistics",
    "evaluated_backbone",
    "extract_features",
    "fit_linear_probe",
    "knn_accuracy",
    "knn_predict",
    "probe_features",
    "save_attention_png",
]
