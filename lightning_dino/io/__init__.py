"""What goes in and out of a run: exported weights, embeddings and streaming datasets.

Export to timm weights (and loading them back), embeddings of a folder, and streaming datasets
written for LitData.
"""

from lightning_dino.io.embed import embed_images, load_embeddings
from lightning_dino.io.export import export_backbone, load_backbone
from lightning_dino.io.prepare import prepare_streaming_dataset

__all__ = [
    "embed_images",
    "export_backbone",
    "load_backbone",
    "load_embeddings",
    "prepare_streaming_dataset",
]
