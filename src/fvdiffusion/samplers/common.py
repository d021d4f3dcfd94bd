"""Pieces every sampler uses to finish a run."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dataclasses import replace

from fvdiffusion import selection
from fvdiffusion.loop import RunContext
from fvdiffusion.population import ParticleState, gather
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


def final_selection(ctx: RunContext, state: ParticleState) -> tuple[ParticleState, float]:
    """Equalise the final weights with the fewest copies; returns (state, fraction replaced).

    The minimal-death rule (survival min(1, N·W_i), parents ∝ excess) is unbiased like any
    resampling scheme but replaces only N·TV(W, uniform) particles in expectation, so it
    never turns distinct samples into duplicates for nothing. Uniform weights are left alone.
    """
    log_w = ctx.guard_all_dead(state.log_weight, 0)
    finite = log_w[torch.isfinite(log_w)]
    if finite.numel() == log_w.numel() and float(finite.max() - finite.min()) <= 1e-12:
        return replace(state, log_weight=torch.zeros_like(state.log_weight)), 0.0
    outcome = selection.fleming_viot(log_w, ctx.generator, parent_rule="excess")
    state = gather(state, outcome.ancestors)
    ctx.lineage.record(0, outcome.ancestors)
    return replace(state, log_weight=torch.zeros_like(state.log_weight)), float(outcome.reborn.double().mean())
