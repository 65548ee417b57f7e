"""The networks: backbones, the DINO head, the forwards and the iBOT masks.

Backbones are any timm model by name or the user's module; the multi-crop forward groups crops
by resolution, the token-wise forward serves iBOT and Gram anchoring; iBOT's patch masks are
block-wise.
"""

from lightning_dino.networks.backbones import MultiCropNetwork, build_student_teacher
from lightning_dino.networks.head import DINOHead
from lightning_dino.networks.masking import batch_masks, block_mask

__all__ = ["DINOHead", "MultiCropNetwork", "batch_masks", "block_mask", "build_student_teacher"]
