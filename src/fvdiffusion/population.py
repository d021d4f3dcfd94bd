"""The particle population and the gathers that copy particles into other slots."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

# Per-particle tensor fields (dim 0 is the particle); ``aux`` entries are per-particle too.
# Across processes a rank holds its block's rows of the sample-shaped tensors and all N of the scalars.
SAMPLE_FIELDS = ("x", "x0_hat", "eps_hat")
SCALAR_FIELDS = ("reward", "log_weight", "root")
PARTICLE_FIELDS = SAMPLE_FIELDS + SCALAR_FIELDS


@dataclass(frozen=True)
class ParticleState:
    """Every per-particle field of a population at one denoising step, and the run's scalars.

    ``aux`` holds method-specific per-particle tensors (e.g. the previous reward for a
    difference potential); they are permuted by :func:`gather` like everything else, so a
    sampler can never forget to move one of them when particles are copied. ``scalars`` holds
    per-run values that belong to the population as a whole (FVD's controller: λ_prev, log κ,
    the selection count); gathers carry them over unchanged. ``history`` holds the transition's
    per-particle memory (a multistep solver's previous x̂0, its order): sample-shaped like x (this
    process's rows across processes) and moved by every gather, so a clone steps on with its parent's.
    The state is never written in place: a selection builds a new one (:func:`gather`).
    """

    x: Tensor            # [N, ...] current x_t
    x0_hat: Tensor       # [N, ...] Tweedie estimate at the current step
    eps_hat: Tensor      # [N, ...] noise estimate at the current step
    reward: Tensor       # [N] float64, last evaluated reward (NaN where never evaluated)
    log_weight: Tensor   # [N] float64 importance log-weights (unnormalised)
    root: Tensor         # [N] long, index of the initial particle each one descends from
    aux: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def with_aux(self, **values: Tensor) -> "ParticleState":
        return replace(self, aux={**self.aux, **values})

    def with_scalars(self, **values: Any) -> "ParticleState":
        return replace(self, scalars={**self.scalars, **values})

    def with_history(self, history: dict[str, Tensor]) -> "ParticleState":
        return replace(self, history=dict(history))


def initial_state(x: Tensor, weight_device: torch.device | None = None, n: int | None = None) -> ParticleState:
    """A fresh population at x; rewards, weights and roots live on ``weight_device`` (default: x's).

    ``n``: the whole population's size when x holds only this process's block of it (the
    per-particle scalars always cover all n particles).
    """
    n = x.shape[0] if n is None else n
    device = x.device if weight_device is None else weight_device
    return ParticleState(
        x=x,
        x0_hat=torch.zeros_like(x),
        eps_hat=torch.zeros_like(x),
        reward=torch.full((n,), float("nan"), dtype=torch.float64, device=device),
        log_weight=torch.zeros(n, dtype=torch.float64, device=device),
        root=torch.arange(n, device=device),
        aux={},
    )


def gather(state: ParticleState, idx: Tensor) -> ParticleState:
    """Slot i of the result is a copy of particle ``idx[i]``: every field moves together.

    Out of place, for any index (a permutation such as best-of-N's ranking included).
    """
    idx = idx.long()
    return ParticleState(
        **{name: _take(getattr(state, name), idx) for name in PARTICLE_FIELDS},
        aux={k: _take(v, idx) for k, v in state.aux.items()},
        scalars=dict(state.scalars),
        history={k: _take(v, idx) for k, v in state.history.items()},
    )


def _take(tensor: Tensor, idx: Tensor) -> Tensor:
    return tensor[idx.to(tensor.device)]

