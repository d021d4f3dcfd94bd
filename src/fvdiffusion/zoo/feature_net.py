"""The feature network: a small convolutional autoencoder whose latent is a second FID/KID space.

Why it exists: the evaluation network was trained with rotation/shift/scale augmentation
and pools its last feature map over the image, so its features are built to *ignore* the
within-class variety (slant, position, size, stroke) that tells a diverse set of digits
from a few digits repeated. The autoencoder is trained without any augmentation to
reconstruct every pixel, and its latent comes from a flattened 7×7 feature map through a
linear bottleneck (no global pooling), so two digits that look different get different
features. See docs/feature_space.md for the measured difference.

The features are the latent standardised per dimension with the mean and std of the train
digits' latents (buffers set once after training): every dimension then counts alike in FID,
and KID's polynomial kernel k(x, y) = (x·y / d + 1)³ sees features of order 1, the scale it
is designed for.

Input: images in [-1, 1], shape [B, 1, 28, 28]; the decoder ends in tanh, back in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

_SIDE = 7  # two stride-2 convolutions: 28 -> 14 -> 7


@dataclass(frozen=True)
class FeatureNetConfig:
    channels1: int = 16
    channels2: int = 32
    latent_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("channels1", "channels2", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureNetConfig.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureNetConfig":
        return cls(**data)


class FeatureNet(nn.Module):
    """Encoder (conv, conv, conv, flatten, linear) -> latent -> mirrored decoder."""

    def __init__(self, config: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FeatureNetConfig()
        flat = c.channels2 * _SIDE * _SIDE
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c.channels1, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c.channels1, c.channels2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c.channels2, c.channels2, 3, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(flat, c.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(c.latent_dim, flat), nn.GELU(), nn.Unflatten(1, (c.channels2, _SIDE, _SIDE)),
            nn.ConvTranspose2d(c.channels2, c.channels1, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c.channels1, 1, 4, stride=2, padding=1), nn.Tanh(),
        )
        self.register_buffer("feature_mean", torch.zeros(c.latent_dim))
        self.register_buffer("feature_std", torch.ones(c.latent_dim))

    @property
    def feature_dim(self) -> int:
        return self.config.latent_dim

    def features(self, x: Tensor) -> Tensor:
        """The standardised latent [B, latent_dim] (for FID/KID)."""
        return (self.encoder(x) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def set_feature_scale(self, images: Tensor, batch_size: int = 500) -> None:
        """Fix the standardisation to the latent mean and std over ``images`` (the train digits)."""
        dev = self.feature_mean.device
        latents = torch.cat([self.encoder(images[i:i + batch_size].to(dev, torch.float32))
                             for i in range(0, images.shape[0], batch_size)])
        self.feature_mean.copy_(latents.mean(0))
        self.feature_std.copy_(latents.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
