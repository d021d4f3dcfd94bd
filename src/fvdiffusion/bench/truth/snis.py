"""Self-normalised importance sampling (SNIS): the exact tilt of a sampler from its own samples.

Given n independent samples x_i of a sampler with law p_K and the reward r, the tilt
π_K ∝ p_K · exp(λ r) has, for any statistic s, the mean

    E_π[s] ≈ Σ_i W_i s(x_i),   W_i = exp(λ r_i) / Σ_j exp(λ r_j)

which is consistent as n grows. Its delta-method standard error is √(Σ_i W_i² (s_i − m)²), and the
effective sample size is ESS = 1 / Σ_i W_i² (n when λ = 0; the estimate is trustworthy while the
ESS is large). :func:`bootstrap_means` resamples the n samples with replacement and recomputes
the estimate, for intervals that keep the correlation between statistics. Pure tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BOOTSTRAP_CHUNK = 64  # bootstrap draws per batched matrix product (memory: chunk · n floats)


@dataclass(frozen=True, eq=False)
class TiltedMoments:
    """Per statistic (in ``names`` order): the base sample's mean and std, the tilted mean with its
    delta-method standard error, the tilted std; and the ESS of the weights."""

    names: tuple[str, ...]
    lam: float
    n: int
    ess: float
    base_mean: Tensor
    base_std: Tensor
    mean: Tensor
    se: Tensor
    std: Tensor

    def shift(self) -> Tensor:
        """(tilted mean − base mean) / base std per statistic."""
        return (self.mean - self.base_mean) / self.base_std

    def as_dict(self) -> dict[str, Any]:
        shift = self.shift()
        return {"lam": self.lam, "n": self.n, "ess": self.ess, "statistics": {
            name: {"base_mean": float(self.base_mean[j]), "base_std": float(self.base_std[j]),
                   "tilted_mean": float(self.mean[j]), "tilted_se": float(self.se[j]),
                   "tilted_std": float(self.std[j]), "shift_in_base_std": float(shift[j])}
            for j, name in enumerate(self.names)}}


def normalized_weights(log_weights: Tensor) -> Tensor:
    """W = softmax(log w) in float64; a non-finite log-weight is refused (it would hide a broken sample)."""
    lw = log_weights.to(torch.float64)
    if lw.ndim != 1 or lw.numel() == 0:
        raise ValueError(f"log_weights must be a non-empty 1-D tensor, got shape {tuple(lw.shape)}")
    if not torch.isfinite(lw).all():
        raise ValueError(f"{int((~torch.isfinite(lw)).sum())} log-weights are not finite")
    return torch.softmax(lw, 0)


def _checked(stats: Tensor, names: tuple[str, ...], log_weights: Tensor) -> Tensor:
    s = stats.to(torch.float64)
    if s.ndim != 2 or s.shape[1] != len(names) or s.shape[0] != log_weights.shape[0]:
        raise ValueError(f"stats must be [n={log_weights.shape[0]}, S={len(names)}], got {tuple(s.shape)}")
    bad = (~torch.isfinite(s)).any(0)
    if bad.any():
        raise ValueError(f"non-finite values in statistic(s) {', '.join(n for n, b in zip(names, bad) if b)}")
    return s


def snis(stats: Tensor, log_weights: Tensor, names: tuple[str, ...], lam: float) -> TiltedMoments:
    """Tilted moments of ``stats`` [n, S] under the weights exp(``log_weights``) [n] (= λ r for the tilt)."""
    w = normalized_weights(log_weights)
    s = _checked(stats, tuple(names), log_weights)
    mean = w @ s
    centred = s - mean
    return TiltedMoments(
        names=tuple(names), lam=float(lam), n=int(s.shape[0]), ess=float(1.0 / w.square().sum()),
        base_mean=s.mean(0), base_std=s.std(0), mean=mean,
        se=(w.square() @ centred.square()).sqrt(), std=(w @ centred.square()).sqrt(),
    )


def tilt(stats: Tensor, names: tuple[str, ...], reward_statistic: str, lam: float) -> TiltedMoments:
    """SNIS for the tilt exp(λ r) where r is the statistic named ``reward_statistic``."""
    r = stats[:, tuple(names).index(reward_statistic)].to(torch.float64)
    return snis(stats, lam * r, names, lam)


def bootstrap_means(stats: Tensor, log_weights: Tensor, n_boot: int, generator: torch.Generator) -> Tensor:
    """[n_boot, S] SNIS means of ``n_boot`` resamples (with replacement) of the n samples."""
    lw = log_weights.to(torch.float64)
    w = torch.exp(lw - lw.max())
    s = stats.to(torch.float64)
    n = s.shape[0]
    out = []
    for lo in range(0, n_boot, BOOTSTRAP_CHUNK):
        draws = torch.randint(n, (min(BOOTSTRAP_CHUNK, n_boot - lo), n), generator=generator)
        counts = torch.zeros(draws.shape, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws,
                                                                                                       dtype=torch.float64))
        mass = counts * w
        out.append((mass @ s) / mass.sum(1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, s.shape[1], dtype=torch.float64)
