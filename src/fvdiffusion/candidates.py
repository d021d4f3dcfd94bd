"""Choosing among candidates by softmax(λ · value): the probabilities, the draw, and its spread.

Shared by the methods that pick one of several candidates per row: svdd keeps one of its M
next-state candidates per particle, dts selects a child per tree node (rollouts and final
descents). An engine-level module, so that no sampler imports another (tests/core/test_layout.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fvdiffusion.checks import HostChecks
from fvdiffusion.potentials import tilt

__all__ = ["choice_probabilities", "draw_from", "ess_fraction"]


def choice_probabilities(values: Tensor, exists: Tensor, lam: float, greedy: bool = False, where: str = "",
                         checks: HostChecks | None = None) -> Tensor:
    """softmax(λ · values) over the columns that exist, per row: [n, C] float64.

    values [n, C] float64 (−inf or NaN = worthless), exists [n, C] bool (every row has a True).
    λ = inf or ``greedy`` puts all mass on the first argmax; λ = 0 is uniform. A row whose
    existing values are all worthless is uniform over its existing columns. A finite λ so large
    that λ·value overflows is refused (ConfigError naming lam, ``where`` it happened).
    """
    worthless = torch.isnan(values) | torch.isneginf(values)
    v = torch.where(exists & ~worthless, values, torch.full_like(values, -math.inf))
    all_worthless = torch.isneginf(v).all(dim=1, keepdim=True)
    v = torch.where(all_worthless & exists, torch.zeros_like(v), v)
    if greedy or math.isinf(lam):
        return torch.nn.functional.one_hot(v.argmax(dim=1), values.shape[1]).to(torch.float64)
    logits = tilt(lam, v, where, checks) if lam > 0 else torch.where(torch.isfinite(v), torch.zeros_like(v), v)
    return torch.softmax(logits, dim=1)


def draw_from(probs: Tensor, uniforms: Tensor) -> Tensor:
    """One column per row by inverse CDF with the given uniforms [n] in [0, 1); zero-mass columns are never hit."""
    cdf = probs.cumsum(dim=1)
    picked = (cdf <= uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]).sum(dim=1)
    return picked.clamp(max=probs.shape[1] - 1)


def ess_fraction(probs: Tensor) -> Tensor:
    """Mean over rows of ESS / C of the choice probabilities (1 = uniform, 1/C = a single column), 0-dim."""
    return (1.0 / (probs * probs).sum(dim=1) / probs.shape[1]).mean()
