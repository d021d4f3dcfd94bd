"""Closed-form rewards for the Gaussian-mixture toy, whose tilted targets are known exactly.

- :class:`ComponentPosteriorReward`: r(x) = log p(k | x); p(x)·exp(r(x)) = w_k N_k(x), so
  λ = 1 tilts the mixture exactly onto component k (``mixture.restrict(k)``).
- :class:`LinearReward`: r(x) = aᵀx; the λ-tilt is ``mixture.tilt_linear(λ a)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture, check_component


def _rows(x0: Tensor) -> Tensor:
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ...], got shape {tuple(x0.shape)}")
    return x0.reshape(x0.shape[0], -1)


def _out_dtype(x0: Tensor) -> torch.dtype:
    return x0.dtype if x0.is_floating_point() else torch.float64


class ComponentPosteriorReward:
    """r(x) = log p(component | x) under ``mixture``."""

    def __init__(self, mixture: GaussianMixture, component: int) -> None:
        self.mixture = mixture
        self.component = check_component(component, mixture.n_components)
        self.name = f"component_log_posterior[{self.component}]"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        log_post = self.mixture.component_log_posterior(_rows(x0))[:, self.component]
        return log_post.to(_out_dtype(x0))


class LinearReward:
    """r(x) = aᵀx for a fixed direction ``a`` [D]."""

    def __init__(self, a: Tensor) -> None:
        a = torch.as_tensor(a, dtype=torch.float64)
        if a.ndim != 1 or a.numel() == 0 or not torch.all(torch.isfinite(a)):
            raise ValueError(f"a must be a finite, non-empty 1-D tensor [D], got shape {tuple(a.shape)}")
        self.a = a
        self.name = "linear"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = _rows(x0)
        if x.shape[1] != self.a.numel():
            raise ValueError(f"x0 must have {self.a.numel()} features per row to match a, got {x.shape[1]}")
        return (x.to(torch.float64) @ self.a.to(x.device)).to(_out_dtype(x0))
