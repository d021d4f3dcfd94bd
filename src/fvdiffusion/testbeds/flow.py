"""The exact toy testbed under the linear (rectified-flow) interpolant x_t = (1 − t) x0 + t ε.

For Gaussian-mixture data x0 ~ Σ_k w_k N(μ_k, Σ_k), x_t given component k is Gaussian with mean
(1 − t) μ_k and covariance C_k = (1 − t)² Σ_k + t² I, so the exact velocity
v(x_t, t) = E[ε − x0 | x_t] = (x_t − E[x0 | x_t]) / t is closed form:

    E[x0 | x_t] = Σ_k p(k | x_t) (μ_k + (1 − t) Σ_k C_k⁻¹ (x_t − (1 − t) μ_k)).

:func:`flow_denoiser` wraps it in :class:`~fvdiffusion.denoisers.flow_matching.FlowMatchingDenoiser`,
so a toy problem's reward and exact target (``fvdiffusion.testbeds.toy_problem``) apply to a
flow-matching model unchanged: the data law and the target do not depend on the path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fvdiffusion.denoisers.flow_matching import FlowMatchingDenoiser
from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture


def flow_law(mixture: GaussianMixture, t: float) -> GaussianMixture:
    """The law of x_t = (1 − t) x0 + t ε for t in (0, 1]: means (1 − t) μ_k, covariances (1 − t)² Σ_k + t² I."""
    t = _check_time(t)
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    return GaussianMixture(mixture.weights, (1 - t) * mixture.means, (1 - t) ** 2 * mixture.covs + t**2 * eye)


def flow_posterior_mean_x0(mixture: GaussianMixture, x_t: Tensor, t: float) -> Tensor:
    """Exact E[x0 | x_t] [n, D] (float64) under the linear interpolant at flow time ``t`` in (0, 1]."""
    t = _check_time(t)
    x = torch.as_tensor(x_t)
    if x.ndim != 2 or x.shape[1] != mixture.dim:
        raise ValueError(f"x_t must have shape [n, {mixture.dim}], got {tuple(x.shape)}")
    x = x.to(torch.float64)
    law = flow_law(mixture, t)
    resp = law.component_log_posterior(x).exp()                                      # [n, K]
    residual = (x[:, None, :] - law.means.to(x.device)[None]).permute(1, 2, 0)      # [K, D, n]
    chol = torch.linalg.cholesky(law.covs.to(x.device))
    solved = torch.cholesky_solve(residual, chol)                                   # C_k⁻¹ (x_t − (1 − t) μ_k)
    cond_means = mixture.means.to(x.device)[:, :, None] + (1 - t) * (mixture.covs.to(x.device) @ solved)
    return torch.einsum("nk,kdn->nd", resp, cond_means)


class GaussianMixtureVelocity:
    """The exact velocity E[ε − x0 | x_t] of a Gaussian mixture: a ``velocity_fn`` for FlowMatchingDenoiser."""

    def __init__(self, mixture: GaussianMixture) -> None:
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        times = torch.as_tensor(t, dtype=torch.float64).cpu()
        if times.ndim == 0:
            times = times.expand(x_t.shape[0])
        if tuple(times.shape) != (x_t.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [{x_t.shape[0]}], got {tuple(times.shape)}")
        x = x_t.to(torch.float64)
        out = torch.empty_like(x)
        values, inverse = torch.unique(times, return_inverse=True)  # samplers pass one time per batch
        for j, value in enumerate(values.tolist()):
            rows = (inverse == j).to(x.device)
            out[rows] = (x[rows] - flow_posterior_mean_x0(self.mixture, x[rows], value)) / value
        return out.to(dtype=x_t.dtype, device=x_t.device)


def flow_denoiser(mixture: GaussianMixture, flow_times: Any = None) -> FlowMatchingDenoiser:
    """The exact flow-matching model of ``mixture`` in the engine's VP view (default table: t_i = (i + 1) / 1000)."""
    velocity = GaussianMixtureVelocity(mixture)
    return FlowMatchingDenoiser(velocity, flow_times, (mixture.dim,))


def _check_time(t: Any) -> float:
    value = float(t)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"flow time t must lie in (0, 1], got {value!r}")
    return value
