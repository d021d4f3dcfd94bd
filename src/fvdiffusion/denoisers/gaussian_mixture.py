"""Gaussian mixtures: the exact toy data law, its noised laws and its exact denoiser.

For data x0 ~ Σ_k w_k N(μ_k, Σ_k) and x_t = √ᾱ x0 + √(1−ᾱ) ε everything a sampler needs is
closed form: the law of x_t is again a mixture, E[x0 | x_t] is a responsibility-weighted
sum of per-component Gaussian conditionals, and tilting by exp(aᵀx) or by p(k | x) gives a
mixture again. That makes this the correctness anchor for every sampler.

Mixture methods compute in float64 and return float64; :class:`GaussianMixtureDenoiser`
casts back to the dtype of its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.schedule import VPSchedule

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, eq=False)
class LabelledSamples:
    """Draws from a mixture together with the component each row came from."""

    x: Tensor       # [n, D]
    labels: Tensor  # [n] long


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Σ_k w_k N(μ_k, Σ_k) with ``weights`` [K], ``means`` [K, D], ``covs`` [K, D, D] (float64)."""

    weights: Tensor
    means: Tensor
    covs: Tensor
    _chol: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        mu = torch.as_tensor(self.means, dtype=torch.float64)
        cov = torch.as_tensor(self.covs, dtype=torch.float64)
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D tensor [K], got shape {tuple(w.shape)}")
        k = w.numel()
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] == 0:
            raise ValueError(f"means must have shape [K={k}, D], got {tuple(mu.shape)}")
        d = mu.shape[1]
        if tuple(cov.shape) != (k, d, d):
            raise ValueError(f"covs must have shape [{k}, {d}, {d}], got {tuple(cov.shape)}")
        if not torch.all(torch.isfinite(w) & (w > 0)):
            raise ValueError(f"weights must be finite and positive, got {w.tolist()}")
        if abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1 (within 1e-6), got sum {float(w.sum())!r}")
        if not torch.all(torch.isfinite(mu)):
            raise ValueError("means must be finite")
        if not torch.all(torch.isfinite(cov)):
            raise ValueError("covs must be finite")
        asym = float((cov - cov.mT).abs().max())
        if asym > 1e-8 * max(1.0, float(cov.abs().max())):
            raise ValueError(f"covs must be symmetric, got max |Σ − Σᵀ| = {asym:.3g}")
        cov = 0.5 * (cov + cov.mT)
        chol, info = torch.linalg.cholesky_ex(cov)
        bad = torch.nonzero(info).flatten().tolist()
        if bad:
            raise ValueError(f"covs must be positive definite; components {bad} are not")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "covs", cov)
        object.__setattr__(self, "_chol", chol)

    @property
    def n_components(self) -> int:
        return self.weights.numel()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ---------------------------------------------------------------- sampling

    def sample_with_labels(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> LabelledSamples:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + (self._chol[labels] @ z.unsqueeze(-1)).squeeze(-1)
        return LabelledSamples(x=x.to(dtype), labels=labels)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` draws [n, D] (float32 unless ``dtype`` says otherwise)."""
        return self.sample_with_labels(n, generator, dtype).x

    # ---------------------------------------------------------------- densities

    def _points(self, x: Tensor, name: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {tuple(x.shape)}")
        return x.to(torch.float64)

    def component_log_joint(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; μ_k, Σ_k) for every row and component: [n, K]."""
        x = self._points(x, "x")
        means, chol = self.means.to(x.device), self._chol.to(x.device)
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device).expand_as(chol)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)            # [K, D, D]
        y = torch.einsum("kij,nkj->nki", chol_inv, x[:, None, :] - means[None])    # whitened residuals
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)    # [K]
        log_norm = -0.5 * (self.dim * _LOG_2PI + log_det[None] + (y**2).sum(-1))
        return torch.log(self.weights.to(x.device))[None] + log_norm

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x): [n]."""
        return torch.logsumexp(self.component_log_joint(x), dim=1)

    def component_log_posterior(self, x: Tensor) -> Tensor:
        """log p(k | x): [n, K], each row normalised by logsumexp."""
        joint = self.component_log_joint(x)
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    # ---------------------------------------------------------------- diffusion

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The law of x_t = √ᾱ x0 + √(1−ᾱ) ε: means √ᾱ μ_k, covariances ᾱ Σ_k + (1−ᾱ) I."""
        a = _check_alpha_bar(alpha_bar)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, math.sqrt(a) * self.means, a * self.covs + (1 - a) * eye)

    def posterior_mean_x0(self, x_t: Tensor, alpha_bar: float | Tensor) -> Tensor:
        """Exact E[x0 | x_t] [n, D]; ``alpha_bar`` is a scalar or one value per row [n]."""
        x = self._points(x_t, "x_t")
        a = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
        if a.ndim == 0:
            a = a.expand(x.shape[0])
        if tuple(a.shape) != (x.shape[0],):
            raise ValueError(f"alpha_bar must be a scalar or have shape [{x.shape[0]}], got {tuple(a.shape)}")
        out = torch.empty_like(x)
        # Samplers use one timestep for the whole batch, so this loop is usually one pass.
        values, inverse = torch.unique(a, return_inverse=True)
        for j, value in enumerate(values.tolist()):
            rows = (inverse == j).to(x.device)
            out[rows] = self._posterior_mean_at(x[rows], value)
        return out

    def _posterior_mean_at(self, x: Tensor, a: float) -> Tensor:
        noisy = self.noised(a)
        resp = noisy.component_log_posterior(x).exp()                         # [n, K]
        # Per component: E[x0 | x_t, k] = μ_k + √ᾱ Σ_k C_k⁻¹ (x_t − √ᾱ μ_k), C_k = ᾱΣ_k + (1−ᾱ)I.
        residual = (x[:, None, :] - noisy.means.to(x.device)[None]).permute(1, 2, 0)  # [K, D, n]
        solved = torch.cholesky_solve(residual, noisy._chol.to(x.device))
        cond_means = self.means.to(x.device)[:, :, None] + math.sqrt(a) * (self.covs.to(x.device) @ solved)
        return torch.einsum("nk,kdn->nd", resp, cond_means)

    # ---------------------------------------------------------------- exact tilts

    def tilt_linear(self, a: Tensor) -> GaussianMixture:
        """The law ∝ p(x) · exp(aᵀx): means μ_k + Σ_k a, weights ∝ w_k exp(aᵀμ_k + ½ aᵀΣ_k a)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        if tuple(a.shape) != (self.dim,) or not torch.all(torch.isfinite(a)):
            raise ValueError(f"a must be a finite vector of shape [{self.dim}], got shape {tuple(a.shape)}")
        cov_a = self.covs @ a                                                 # [K, D]
        log_w = torch.log(self.weights) + self.means @ a + 0.5 * (cov_a @ a)
        return GaussianMixture(torch.softmax(log_w, dim=0), self.means + cov_a, self.covs)

    def restrict(self, component: int) -> GaussianMixture:
        """Component ``component`` alone: the exact law ∝ p(x) · p(component | x)."""
        k = check_component(component, self.n_components)
        return GaussianMixture(torch.ones(1, dtype=torch.float64), self.means[k : k + 1], self.covs[k : k + 1])


def check_component(component: Any, n_components: int) -> int:
    """Validate a component index; returns it as an int."""
    if isinstance(component, bool) or not isinstance(component, int) or not 0 <= component < n_components:
        raise ValueError(f"component must be an int in [0, {n_components}), got {component!r}")
    return component


def mixture_mean(m: GaussianMixture) -> Tensor:
    """E[x] = Σ_k w_k μ_k: [D]."""
    return m.weights @ m.means


def mixture_cov(m: GaussianMixture) -> Tensor:
    """Cov[x] = Σ_k w_k (Σ_k + μ_k μ_kᵀ) − E[x]E[x]ᵀ: [D, D]."""
    mean = mixture_mean(m)
    second = torch.einsum("k,kij->ij", m.weights, m.covs + m.means[:, :, None] * m.means[:, None, :])
    return second - torch.outer(mean, mean)


def _check_alpha_bar(alpha_bar: float) -> float:
    a = float(alpha_bar)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha_bar must lie in [0, 1], got {a!r}")
    return a


class GaussianMixtureDenoiser:
    """The exact x0-predicting denoiser E[x0 | x_t] of a Gaussian-mixture data law."""

    def __init__(self, mixture: GaussianMixture, schedule: VPSchedule) -> None:
        self.mixture = mixture
        self.schedule = schedule
        self.prediction_type = "x0"
        self.sample_shape = (mixture.dim,)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != self.mixture.dim:
            raise ValueError(f"x_t must have shape [B, {self.mixture.dim}], got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if tuple(t.shape) != (x_t.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [{x_t.shape[0]}], got {tuple(t.shape)}")
        T = self.schedule.num_train_timesteps
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= T):
            raise ValueError(f"t must lie in [-1, {T - 1}], got values in [{int(t.min())}, {int(t.max())}]")
        x0 = self.mixture.posterior_mean_x0(x_t, self.schedule.alpha_bar(t))
        return x0.to(dtype=x_t.dtype, device=x_t.device)
