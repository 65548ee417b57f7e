"""What goes in and out of a run: exported weights, embeddings, a distillation's frozen teacher.

Export to timm weights (and loading them back), embeddings of a folder, and loading the frozen
teacher of a distillation run. Streaming datasets (writer and reader) are in
:mod:`lightning_dino.data.prepared`.
"""

from lightning_dino.io.embed import embed_images, load_embeddings
from lightning_dino.io.export import export_backbone, load_backbone

__all__ = [
    "embed_images",
    "export_backbone",
    "load_backbone",
    "load_embeddings",
]
