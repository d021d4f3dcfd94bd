"""The statistics of x0 the ground-truth benchmark compares: small, cheap, deterministic vectors.

A method is judged by the tilted mean of each statistic, so the statistics should see different
things: the reward itself, where the ink is, how spread it is, and a few fixed directions in
pixel space. Every statistic is a fixed function of one sample (no randomness at call time;
the projection directions are drawn once from fixed seeds), computed in float64.

- :class:`MnistStatistics` — 1x28x28 digits in [-1, 1] (ink = (x + 1) / 2):
  ``mean_ink`` (mean ink over all pixels; the reward of the MNIST testbed), ``top_half_ink``
  (rows 0-13), ``left_half_ink`` (columns 0-13), ``centre_ink`` (the central 14x14 box),
  ``centroid_row`` / ``centroid_col`` (ink-weighted mean row / column, in pixels), ``ink_spread``
  (ink-weighted radius of gyration, in pixels), ``energy`` (mean x², the one quadratic statistic),
  ``proj_1`` … ``proj_4`` (⟨x, u_j⟩ on unit directions u_j: N(0, 1) on a 7x7 grid, seeds 2024 + j,
  upsampled bilinearly to 28x28, so each sees a smooth layout of the page). The means are linear
  in x, unclamped; the centroid and spread use ink clamped to [0, 1] so they stay in the image.
- :class:`VectorStatistics` — flat vectors (the exact Gaussian-mixture testbeds): the reward
  ``a·x``, the first coordinates, and the squared norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

PROJECTION_SEED = 2024
PROJECTIONS = 4
PROJECTION_GRID = 7


def projection_directions(shape: tuple[int, int], count: int = PROJECTIONS, seed: int = PROJECTION_SEED) -> Tensor:
    """[count, H·W] smooth unit directions: N(0, 1) on a 7x7 grid (seed + j), bilinear to H x W."""
    rows = []
    for j in range(1, count + 1):
        coarse = torch.randn(1, 1, PROJECTION_GRID, PROJECTION_GRID, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed + j))
        fine = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear", align_corners=True).flatten()
        rows.append(fine / fine.norm())
    return torch.stack(rows)


@dataclass(frozen=True, eq=False)
class MnistStatistics:
    """The statistic vector of 1x28x28 digits (see the module docstring)."""

    size: int = 28
    directions: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", projection_directions((self.size, self.size)))

    @property
    def names(self) -> tuple[str, ...]:
        return ("mean_ink", "top_half_ink", "left_half_ink", "centre_ink", "centroid_row", "centroid_col",
                "ink_spread", "energy", *(f"proj_{j}" for j in range(1, PROJECTIONS + 1)))

    def __call__(self, x0: Tensor) -> Tensor:
        """[B, S] float64 on the CPU for x0 [B, 1, H, W]."""
        if x0.ndim != 4 or tuple(x0.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"expected digits [B, 1, {self.size}, {self.size}], got {tuple(x0.shape)}")
        x = x0.detach().to("cpu", torch.float64)[:, 0]
        ink = (x + 1) / 2
        half, quarter = self.size // 2, self.size // 4
        clamped = ink.clamp(0, 1)
        mass = clamped.sum(dim=(1, 2)).clamp_min(1e-6)
        index = torch.arange(self.size, dtype=torch.float64)
        row = (clamped.sum(2) * index).sum(1) / mass
        col = (clamped.sum(1) * index).sum(1) / mass
        radius2 = (index[None, :, None] - row[:, None, None]) ** 2 + (index[None, None, :] - col[:, None, None]) ** 2
        spread = ((clamped * radius2).sum(dim=(1, 2)) / mass).sqrt()
        projections = x.flatten(1) @ self.directions.T
        return torch.stack([
            ink.mean(dim=(1, 2)),
            ink[:, :half].mean(dim=(1, 2)),
            ink[:, :, :half].mean(dim=(1, 2)),
            ink[:, quarter: quarter + half, quarter: quarter + half].mean(dim=(1, 2)),
            row, col, spread,
            x.square().mean(dim=(1, 2)),
            *projections.unbind(1),
        ], dim=1)


@dataclass(frozen=True, eq=False)
class VectorStatistics:
    """``reward`` = a·x, the first ``coordinates`` coordinates ``x_1`` …, and ``sq_norm`` = |x|²."""

    a: Tensor
    coordinates: int = 2

    @property
    def names(self) -> tuple[str, ...]:
        return ("reward", *(f"x_{j}" for j in range(1, self.coordinates + 1)), "sq_norm")

    def __call__(self, x0: Tensor) -> Tensor:
        x = x0.detach().to("cpu", torch.float64).reshape(x0.shape[0], -1)
        return torch.cat([(x @ self.a.to(torch.float64))[:, None], x[:, : self.coordinates],
                          x.square().sum(1, keepdim=True)], dim=1)
