"""Pieces every sampler uses to finish a run."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fvdiffusion.loop import RunContext
from fvdiffusion.population import ParticleState
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.config import CommonConfig


def resolved_config(method: str, config: CommonConfig) -> dict[str, Any]:
    return {"method": method, **config.as_dict()}


def make_result(
    ctx: RunContext,
    method: str,
    state: ParticleState,
    final_rewards: Tensor,
    log_weights: Tensor,
    extras: dict[str, Any] | None = None,
) -> SampleResult:
    finite = torch.isfinite(log_weights)
    if finite.any():
        log_weights = log_weights - torch.logsumexp(log_weights[finite], dim=0)
    else:
        log_weights = torch.full_like(log_weights, -torch.log(torch.tensor(float(log_weights.numel()))).item())
    return SampleResult(
        samples=state.x,
        rewards=final_rewards,
        log_weights=log_weights,
        lineage=ctx.lineage,
        trace=ctx.trace,
        cost=ctx.cost,
        config=resolved_config(method, ctx.config),
        extras=extras or {},
    )
