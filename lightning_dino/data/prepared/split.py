"""LitData's ``StreamingDataset`` of a prepared split whose read errors name the chunk file.

Imports LitData (the ``streaming`` extra): :mod:`lightning_dino.data.prepared.streaming`
imports this module only once it has checked that LitData is installed.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litdata import StreamingDataset
from litdata.exceptions import ChunkWaitTimeoutError
from litdata.streaming.sampler import ChunkedIndex

from lightning_dino.data.prepared.files import (
    CorruptDatasetError,
    DecodeSample,
    error_name,
    fix_advice,
    is_url,
    parent_dir,
    split_dir,
)


class PreparedSplit(StreamingDataset):
    """LitData's ``StreamingDataset`` of a prepared split whose read errors name the chunk.

    An item that LitData cannot read, or whose image does not decode (``prepare`` decoded every
    stored image once, so it is damage), raises :class:`CorruptDatasetError` naming the chunk
    file, the item and ``fix``; the transform's own errors pass through unchanged.

    Args:
        input_dir: The split's directory or URL (e.g. ``DIR/train``).
        decode: Decodes and transforms each item in the workers (``(image, label)`` samples);
            None yields LitData's items (``{"index", "image", "label"}`` dicts).
        fix: What to do about a damaged chunk (how to prepare the dataset again).
        **kwargs: ``StreamingDataset``'s other arguments (not ``transform``).
    """

    def __init__(
        self, input_dir: str, decode: DecodeSample | None = None, fix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(input_dir, **kwargs)
        self.split, self.decode = input_dir, decode
        self.fix = fix or fix_advice(parent_dir(input_dir))

    def __getitem__(self, index: Any) -> Any:
        """The item (or decoded sample) at ``index``; see the class description."""
        if not isinstance(index, int | ChunkedIndex):  # slices, keys: LitData's own
            return super().__getitem__(index)
        with self.naming_chunk(index):
            item = super().__getitem__(index)
            if self.decode is None:
                return item
            image, label = self.decode.read(item)
        return self.decode.apply(image), label

    @contextmanager
    def naming_chunk(self, index: int | ChunkedIndex) -> Iterator[None]:
        """Re-raise an error of the block as :class:`CorruptDatasetError` naming the chunk.

        Args:
            index: The item read in the block: a global position or LitData's ``ChunkedIndex``.

        Yields:
            Nothing.

        Raises:
            CorruptDatasetError: For any error but an ``IndexError``, a ``CorruptDatasetError``
                already raised and a remote download's timeout.
        """
        try:
            yield
        except (IndexError, CorruptDatasetError):
            raise
        except Exception as err:
            if isinstance(err, ChunkWaitTimeoutError) and is_url(self.split):
                raise  # a slow or hung download, not a damaged chunk
            raise self._corrupt(index, err) from err

    def _corrupt(self, index: int | ChunkedIndex, error: Exception) -> CorruptDatasetError:
        """The error naming the chunk of ``index``, the failure and the fix."""
        position = index if isinstance(index, int) else index.index
        chunk = self._chunk_of(index)
        where = chunk or f"the chunk of item {position}"
        if chunk and is_url(self.split):
            where += " (read from its copy in LitData's chunk cache)"
        return CorruptDatasetError(
            f"{where} is damaged: item {position} of {self.split} cannot be read "
            f"({error_name(error)}: {error}); {self.fix}"
        )

    def _chunk_of(self, index: int | ChunkedIndex) -> str | None:
        """The path or URL of the chunk file holding ``index``, or None if it cannot be told."""
        try:
            if isinstance(index, ChunkedIndex):
                chunk = index.chunk_index
            else:  # the chunks hold consecutive items, region_of_interest counts them
                sizes = (end - start for start, end in self.region_of_interest)
                chunk = bisect.bisect_right(list(itertools.accumulate(sizes)), index)
            return split_dir(self.split, self.subsampled_files[chunk])
        except (IndexError, TypeError, ValueError):
            return None
