"""Block-wise patch masks for the iBOT loss (BEiT's masking scheme, as DINOv2 and DINOv3 draw it).

References: Bao et al., *BEiT: BERT Pre-Training of Image Transformers*, ICLR 2022 (block-wise
masking); Oquab et al., *DINOv2*, TMLR 2024 (``collate_data_and_cast``: half of the images are
masked, with ratios spread over [0.1, 0.5]); facebookresearch/dinov3 ``dinov3/data/collate.py``
and ``dinov3/data/masking.py`` (each masked image's ratio at the upper edge of its interval, the
count made exact by masking the missing patches at random).
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
    exact: bool = False,
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
        exact: When the blocks end short, mask the missing patches chosen uniformly among the
            unmasked ones, so exactly ``n_masked`` are masked (DINOv3's
            ``complete_mask_randomly``).

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
    if exact and count < n_masked:
        free = (~mask).flatten().nonzero().flatten()
        chosen = free[torch.randperm(len(free))[: n_masked - count]]
        mask.view(-1)[chosen] = True
    return mask


def batch_masks(
    n_images: int,
    height: int,
    width: int,
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    rule: str = "dinov2",
) -> Tensor:
    """Masks for a batch as DINOv2 (or DINOv3) draws them: some images masked, the rest not.

    ``int(n_images * probability)`` images get a block mask, each block at most half the
    patches; their mask ratios are spread over ``ratio`` in as many equal sub-intervals. With
    ``rule="dinov2"`` image i draws its ratio uniformly in the i-th sub-interval and its mask may
    end a little short; with ``rule="dinov3"`` image i masks exactly ``int(N * edge_{i+1})``
    patches (the sub-interval's upper edge, computed in float32 as DINOv3 does), the blocks
    completed at random. The masked and unmasked images are shuffled.

    Args:
        n_images: Images in the batch (every global crop of every sample).
        height: Patch rows.
        width: Patch columns.
        ratio: (min, max) fraction of the patches masked in a masked image.
        probability: Fraction of the images that are masked.
        rule: ``"dinov2"`` or ``"dinov3"``.

    Returns:
        Boolean tensor (n_images, height * width).
    """
    n_patches = height * width
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked_images + 1)  # float32, as both do
    masks = [torch.zeros(n_patches, dtype=torch.bool) for _ in range(n_images)]
    for i in range(n_masked_images):
        if rule == "dinov3":
            count, exact = int(n_patches * edges[i + 1]), True
        else:
            low, high = float(edges[i]), float(edges[i + 1])
            count, exact = int(n_patches * (low + (high - low) * float(torch.rand(())))), False
        masks[i] = block_mask(
            height, width, count, max_block=n_patches // 2, exact=exact
        ).flatten()
    order = torch.randperm(n_images).tolist()
    return torch.stack([masks[i] for i in order])
