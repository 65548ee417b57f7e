"""Prepared (streaming) datasets, writer and reader together.

``lightning-dino prepare`` writes an image folder once as a LitData dataset
(:mod:`~lightning_dino.data.prepared.writer`); ``--data.dataset streaming`` reads it on one
node or many (:mod:`~lightning_dino.data.prepared.streaming`), through the checked files of
:mod:`~lightning_dino.data.prepared.files` and, where LitData is installed (the ``streaming``
extra), the damage-aware split of :mod:`~lightning_dino.data.prepared.split`.
"""

from lightning_dino.data.prepared.streaming import PreparedDataset, StreamingImages
from lightning_dino.data.prepared.writer import prepare_streaming_dataset

__all__ = ["PreparedDataset", "StreamingImages", "prepare_streaming_dataset"]
