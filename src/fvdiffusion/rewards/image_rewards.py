"""Image rewards that need no model weights: for tests, demos and sanity checks.

Every image reward takes float images [B, 3, H, W] in [0, 1] (and an unused ``cond``) and
returns a float Tensor [B] on the images' device: the :data:`ImageReward` contract. Apply them
to pixel or latent diffusion samples through ``PixelImageReward`` / ``LatentImageReward``
(``fvdiffusion.integrations.diffusers``).
"""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.rewards.model_rewards import require

ImageReward = Callable[[Tensor, Any], Tensor]  # images [B, 3, H, W] in [0, 1], cond -> [B]


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")


class Brightness:
    """Mean pixel value in [0, 1]: a reward with a strong, simple signal even on random models."""

    name = "brightness"

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        _check_images(images)
        return images.float().mean(dim=(1, 2, 3))


class Colourfulness:
    """Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3 μ_rgyb, on the 0–255 scale.

    rg = R − G and yb = (R + G)/2 − B per pixel; σ and μ combine the two opponent channels'
    standard deviations and means. On that scale 0 is grey and ~100 is extremely colourful.
    """

    name = "colourfulness"

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        _check_images(images)
        rgb = images.float().flatten(2) * 255.0  # [B, 3, H·W]
        r, g, b = rgb.unbind(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        sigma = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
        mu = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
        return sigma + 0.3 * mu


class JpegCompressibility:
    """Negative JPEG file size in kilobytes (DDPO's compressibility reward): simpler images score higher."""

    name = "jpeg"

    def __init__(self, quality: int = 95) -> None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"quality must be an integer in [1, 95], got {quality!r}")
        self.quality = quality

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        _check_images(images)
        image_module = require("PIL.Image", "plot")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            image_module.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell())
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / 1000.0
