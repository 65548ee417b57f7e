"""Block-wise patch masks for the iBOT loss (BEiT's masking scheme, as DINOv2 draws it).

References: Bao et al., *BEiT: BERT Pre-Training of Image Transformers*, ICLR 2022 (block-wise
masking); Oquab et al., *DINOv2*, TMLR 2024 (``collate_data_and_cast``: half of the images are
masked, with ratios spread over [0.1, 0.5]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def block_mask(
    height: int,
    width: int,
    n_masked: int,
    min_block: int = 4,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """A (height, width) boolean mask of about ``n_masked`` patches, made of rectangular blocks.

    Blocks are added until ``n_masked`` patches are covered: each has an area drawn uniformly
    between ``min_block`` and what is still to mask (at most ``max_block``), a log-uniform aspect
    ratio in ``aspect``, a uniform position, and must add at least one new patch without pushing
    the total over the target (10 tries per block; the mask stops growing when none fits, so it
    may end a little short, as BEiT's does).

    Args:
        height: Patch rows.
        width: Patch columns.
        n_masked: Target number of masked patches (0 gives an empty mask).
        min_block: Smallest block area in patches (4 in BEiT and DINOv2).
        max_block: Largest block area (DINOv2: half the patches); None: ``n_masked``.
        aspect: (min, max) block aspect ratio h / w.

    Returns:
        Boolean tensor (height, width).
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_block = n_masked if max_block is None else max_block
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = min_block + (budget - min_block) * float(torch.rand(()))
            ratio = math.exp(log_low + (log_high - log_low) * float(torch.rand(())))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def batch_masks(
    n_images: int,
    height: int,
    width: int,
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
) -> Tensor:
    """Masks for a batch as DINOv2 draws them: a fraction of the images masked, the rest not.

    ``int(n_images * probability)`` images get a block mask; their mask ratios are spread over
    ``ratio`` (image i draws uniformly in the i-th of as many equal sub-intervals), each mask at
    most half the patches per block. The masked and unmasked images are shuffled.

    Args:
        n_images: Images in the batch (every global crop of every sample).
        height: Patch rows.
        width: Patch columns.
        ratio: (min, max) fraction of the patches masked in a masked image.
        probability: Fraction of the images that are masked.

    Returns:
        Boolean tensor (n_images, height * width).
    """
    n_patches = height * width
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked_images + 1).tolist()
    masks = [torch.zeros(n_patches, dtype=torch.bool) for _ in range(n_images)]
    for i in range(n_masked_images):
        fraction = edges[i] + (edges[i + 1] - edges[i]) * float(torch.rand(()))
        masks[i] = block_mask(
            height, width, int(n_patches * fraction), max_block=n_patches // 2
        ).flatten()
    order = torch.randperm(n_images).tolist()
    return torch.stack([masks[i] for i in order])
