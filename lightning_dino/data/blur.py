"""Gaussian blur as two 1-D convolutions, for one image or a batch with one sigma per image.

torchvision's ``gaussian_blur`` convolves with the full k x k kernel; the Gaussian is separable,
so a column pass and a row pass with the same 1-D kernel give the same result (to float
rounding) in 2k instead of k^2 multiplications per pixel: 6.5x fewer for DINO's 13-tap kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, one per sigma, as torchvision's ``gaussian_blur``.

    Args:
        sigma: float (n,) standard deviations in pixels.
        kernel_size: Odd kernel length.

    Returns:
        float32 (n, kernel_size).
    """
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=sigma.device)
    return torch.softmax(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)) ** 2, dim=1)


def blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image with its own Gaussian (separable, reflect padding).

    Args:
        images: float (n, C, H, W).
        sigma: float (n,) standard deviations in pixels.
        kernel_size: Odd kernel length, smaller than H and W.

    Returns:
        float (n, C, H, W).
    """
    n, c, h, w = images.shape
    kernels = gaussian_kernels(sigma, kernel_size).to(images.dtype).repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, -1)
    # Depthwise convolutions run faster channels-last on the CPU (1.4-3x measured, one core).
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    x = F.conv2d(x, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    return x.reshape(n, c, h, w).contiguous()


class SeparableGaussianBlur(v2.GaussianBlur):
    """``torchvision.transforms.v2.GaussianBlur`` computed as two 1-D passes.

    Same parameters, same random sigma draw (one per call, uniform in ``sigma``), same reflect
    padding and, for uint8 images, the same rounding back to uint8; only the convolution is
    separable. Non-tensor inputs (PIL images) go to torchvision's own kernel.

    Args:
        kernel_size: Odd kernel side.
        sigma: (min, max) of the uniformly drawn standard deviation, in pixels.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Blur one (C, H, W) or (B, C, H, W) tensor image with this call's sigma."""
        if not isinstance(inpt, Tensor) or inpt.ndim not in (3, 4):
            return super().transform(inpt, params)
        batch = inpt if inpt.ndim == 4 else inpt.unsqueeze(0)
        sigma = torch.full((batch.shape[0],), params["sigma"][0], device=inpt.device)
        out = blur(batch.float(), sigma, self.kernel_size[0])
        if not inpt.is_floating_point():
            out = out.round_().to(inpt.dtype)
        return out if inpt.ndim == 4 else out.squeeze(0)
