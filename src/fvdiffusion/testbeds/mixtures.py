"""The exact toy testbed: Gaussian-mixture data, analytic rewards, exact tilted targets.

Names are ``<mixture>-<kind>``: mixtures ``gmm2d``, ``gmm8d``, ``gmm16d``; kinds
``component`` (r = log p(k | x), λ = 1, target = component k alone), ``linear``
(r = aᵀx, λ = 1, target = the exact linear tilt) and ``base`` (no reward; target = the
mixture itself, for checking plain sampling).

``rare16d`` / ``rare32d`` are high-dimensional mixtures with anisotropic components, unequal
weights and a rare target component (prior 0.02). The other mixtures are built so the problem
is not trivial: the target component has prior weight 0.12, and at ᾱ = 0.5 the noised components overlap heavily while the clean ones are well
separated, so early selection decisions are uncertain and matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture, GaussianMixtureDenoiser, mixture_mean
from fvdiffusion.rewards.analytic import ComponentPosteriorReward, LinearReward
from fvdiffusion.rewards.base import Reward
from fvdiffusion.schedule import VPSchedule

# Strength of the linear reward; with it the target component's tilted weight is about 0.4–0.5.
LINEAR_REWARD_SCALE = 1.0


@dataclass(frozen=True, eq=False)
class ToyProblem:
    """Data law ``mixture``, reward, and the exact target π* ∝ mixture · exp(lam · reward)."""

    name: str
    mixture: GaussianMixture
    reward: Reward | None            # None: plain sampling, the target is the mixture
    target: GaussianMixture
    target_component: int | None     # the mixture component π* sits on, if any
    lam: float
    dim: int

    def __post_init__(self) -> None:
        if self.mixture.dim != self.dim or self.target.dim != self.dim:
            raise ValueError(
                f"dim={self.dim} must equal mixture.dim={self.mixture.dim} and target.dim={self.target.dim}"
            )
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam!r}")
        if self.reward is None and self.lam != 0:
            raise ValueError(f"lam must be 0 when reward is None, got {self.lam!r}")
        k = self.target_component
        if k is not None and not 0 <= k < self.mixture.n_components:
            raise ValueError(f"target_component must be in [0, {self.mixture.n_components}), got {k!r}")

    def denoiser(self, schedule: VPSchedule) -> GaussianMixtureDenoiser:
        """The exact denoiser of this problem's data law."""
        return GaussianMixtureDenoiser(self.mixture, schedule)


def _rotated_cov(stds: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return rotation @ torch.diag(stds**2) @ rotation.T


def mixture_2d() -> GaussianMixture:
    """Five anisotropic components on a circle of radius 1.5; component 4 (weight 0.12) is the target."""
    weights = torch.tensor([0.30, 0.25, 0.18, 0.15, 0.12], dtype=torch.float64)
    angles = [math.pi / 2 + 2 * math.pi * k / 5 for k in range(5)]
    means = 1.5 * torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)
    stds = torch.tensor([0.30, 0.15], dtype=torch.float64)
    covs = []
    for k in range(5):
        phi = 0.7 * k  # distinct orientations so no component is a shifted copy of another
        rot = torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)
        covs.append(_rotated_cov(stds, rot))
    return GaussianMixture(weights, means, torch.stack(covs))


def mixture_nd(dim: int) -> GaussianMixture:
    """Six components at 1.6·e_k (centred), random rotated covariances (std 0.2–0.4); target is 5."""
    n_components = 6
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < n_components:
        raise ValueError(f"dim must be an int >= {n_components}, got {dim!r}")
    weights = torch.tensor([0.28, 0.22, 0.16, 0.12, 0.10, 0.12], dtype=torch.float64)
    means = torch.zeros(n_components, dim, dtype=torch.float64)
    means[:, :n_components] = 1.6 * torch.eye(n_components, dtype=torch.float64)
    means = means - means.mean(0)  # pairwise distances stay 1.6·√2
    gen = torch.Generator().manual_seed(1000 + dim)
    stds = torch.logspace(math.log10(0.2), math.log10(0.4), dim, dtype=torch.float64)
    covs = []
    for _ in range(n_components):
        rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        covs.append(_rotated_cov(stds, rot))
    return GaussianMixture(weights, means, torch.stack(covs))


RARE_WEIGHTS = (0.40, 0.24, 0.16, 0.10, 0.08, 0.02)  # the last (target) component is rare


def mixture_rare(dim: int) -> GaussianMixture:
    """Six axis-aligned anisotropic components with unequal weights; the target (5) has prior 0.02.

    Per-axis stds run from 0.2 to 0.6 in a different order for every component, so the
    components differ in shape as well as place; means sit at 2·e_k plus a small random offset
    (centred). Under DDIM a clone that keeps its parent's path stays on it: this is where the
    rebirth kernel decides the result.
    """
    n_components = len(RARE_WEIGHTS)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < n_components:
        raise ValueError(f"dim must be an int >= {n_components}, got {dim!r}")
    gen = torch.Generator().manual_seed(2000 + dim)
    means = torch.zeros(n_components, dim, dtype=torch.float64)
    means[:, :n_components] = 2.0 * torch.eye(n_components, dtype=torch.float64)
    means = means + 0.3 * torch.randn(n_components, dim, generator=gen, dtype=torch.float64)
    means = means - means.mean(0)
    stds = torch.logspace(math.log10(0.2), math.log10(0.6), dim, dtype=torch.float64)
    covs = torch.stack([torch.diag(stds[torch.randperm(dim, generator=gen)] ** 2) for _ in range(n_components)])
    return GaussianMixture(torch.tensor(RARE_WEIGHTS, dtype=torch.float64), means, covs)


_MIXTURES: dict[str, Callable[[], GaussianMixture]] = {
    "gmm2d": mixture_2d,
    "gmm8d": lambda: mixture_nd(8),
    "gmm16d": lambda: mixture_nd(16),
    "rare16d": lambda: mixture_rare(16),
    "rare32d": lambda: mixture_rare(32),
}
_TARGET_COMPONENT = {"gmm2d": 4, "gmm8d": 5, "gmm16d": 5, "rare16d": 5, "rare32d": 5}
_KINDS = ("component", "linear", "base")
TOY_PROBLEMS = tuple(f"{m}-{kind}" for m in _MIXTURES for kind in _KINDS)


def _split(name: str) -> tuple[str, str]:
    mixture_name, _, kind = name.rpartition("-")
    if mixture_name not in _MIXTURES or kind not in _KINDS:
        raise ValueError(f"unknown toy problem {name!r}; valid names: {', '.join(TOY_PROBLEMS)}")
    return mixture_name, kind


def toy_problem(name: str) -> ToyProblem:
    """Build a named toy problem (see the module docstring for the names)."""
    mixture_name, kind = _split(name)
    mixture = _MIXTURES[mixture_name]()
    k = _TARGET_COMPONENT[mixture_name]
    if kind == "base":
        return ToyProblem(name, mixture, None, mixture, None, 0.0, mixture.dim)
    if kind == "component":
        reward = ComponentPosteriorReward(mixture, k)
        return ToyProblem(name, mixture, reward, mixture.restrict(k), k, 1.0, mixture.dim)
    # Linear: push towards the target component, from the mixture mean.
    direction = mixture.means[k] - mixture_mean(mixture)
    a = LINEAR_REWARD_SCALE * direction / direction.norm()
    return ToyProblem(name, mixture, LinearReward(a), mixture.tilt_linear(a), None, 1.0, mixture.dim)


def base_problem(name: str) -> ToyProblem:
    """The untilted problem (target = data law) for the mixture of toy problem ``name``."""
    mixture_name, _ = _split(name)
    return toy_problem(f"{mixture_name}-base")
