"""The particle population and the one gather that permutes it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class ParticleState:
    """Every per-particle field of a population at one denoising step.

    ``aux`` holds method-specific per-particle tensors (e.g. the previous reward for a
    difference potential); they are permuted by :func:`gather` like everything else, so a
    sampler can never forget to move one of them when particles are copied.
    """

    x: Tensor            # [N, ...] current x_t
    x0_hat: Tensor       # [N, ...] Tweedie estimate at the current step
    eps_hat: Tensor      # [N, ...] noise estimate at the current step
    reward: Tensor       # [N] float64, last evaluated reward (NaN where never evaluated)
    log_weight: Tensor   # [N] float64 importance log-weights (unnormalised)
    root: Tensor         # [N] long, index of the initial particle each one descends from
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def with_aux(self, **values: Tensor) -> "ParticleState":
        return replace(self, aux={**self.aux, **values})


def initial_state(x: Tensor) -> ParticleState:
    n = x.shape[0]
    return ParticleState(
        x=x,
        x0_hat=torch.zeros_like(x),
        eps_hat=torch.zeros_like(x),
        reward=torch.full((n,), float("nan"), dtype=torch.float64),
        log_weight=torch.zeros(n, dtype=torch.float64),
        root=torch.arange(n),
        aux={},
    )


def gather(state: ParticleState, idx: Tensor) -> ParticleState:
    """Slot i of the result is a copy of particle ``idx[i]``: every field moves together."""
    idx = idx.long()
    dev_idx = idx.to(state.x.device)
    return ParticleState(
        x=state.x[dev_idx],
        x0_hat=state.x0_hat[dev_idx],
        eps_hat=state.eps_hat[dev_idx],
        reward=state.reward[idx],
        log_weight=state.log_weight[idx],
        root=state.root[idx],
        aux={k: v[idx.to(v.device)] for k, v in state.aux.items()},
    )
