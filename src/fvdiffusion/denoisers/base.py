"""The Denoiser protocol and the plain-module adapter."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fvdiffusion.schedule import PREDICTION_TYPES, VPSchedule


@runtime_checkable
class Denoiser(Protocol):
    """A pretrained diffusion model as the engine sees it.

    ``__call__(x_t, t, cond)`` takes a batch x_t [B, ...] and integer timesteps t [B]
    (indices into ``schedule.alphas_cumprod``) and returns a prediction of the same shape
    as x_t, of kind ``prediction_type`` ("eps", "x0" or "v").
    """

    schedule: VPSchedule
    prediction_type: str
    sample_shape: tuple[int, ...]

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


class ModuleDenoiser:
    """Wrap a ``torch.nn.Module`` whose forward is ``module(x_t, t)`` (or ``module(x_t, t, cond)``)."""

    def __init__(
        self,
        module: torch.nn.Module,
        schedule: VPSchedule,
        sample_shape: tuple[int, ...],
        prediction_type: str = "eps",
        uses_cond: bool = False,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.module = module
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.prediction_type = prediction_type
        self.uses_cond = uses_cond

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.uses_cond:
            return self.module(x_t, t, cond)
        return self.module(x_t, t)


class CountingDenoiser:
    """Forwards to another denoiser and counts the particles it was called on (for cost tests)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.schedule = inner.schedule
        self.prediction_type = inner.prediction_type
        self.sample_shape = inner.sample_shape
        self.calls = 0  # number of particle evaluations (rows), not of batches

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self.calls += x_t.shape[0]
        return self.inner(x_t, t, cond)
