"""VASR: systematic resampling on the mass m_i ∝ w_i · exp(λ r_i), reweighted by w/m.

Resampling on m instead of w over-selects the currently best particles; the offspring of
particle i then carry weight w_i / m_i = exp(−λ r_i) (up to a constant), which keeps the
weighted population targeting p·exp(λ r). Weights follow the difference potential.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fvdiffusion import selection
from fvdiffusion.loop import (
    RunContext, StepInfo, plain_trace, potentials_from, refuse_overflow, run_particle_loop, run_with_cost, tilt,
)
from fvdiffusion.population import ParticleState, gather
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.common import final_selection, make_result
from fvdiffusion.samplers.config import CommonConfig, SelectionScheduleMixin


@dataclass(frozen=True)
class VASRConfig(SelectionScheduleMixin, CommonConfig):
    """final_selection: equalise the final weights once more with the minimal-death rule."""

    final_selection: bool = True

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_schedule()


class VASRPolicy:
    def __init__(self, config: VASRConfig) -> None:
        self.config = config

    def __call__(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        if not cfg.is_selection_step(info.index, cfg.num_steps):
            return state, plain_trace(info, state, cfg.lam, ess=selection.ess(state.log_weight))
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        prev = state.aux.get("r_prev", torch.zeros_like(reward))
        where = f" at step k={info.k}"
        inc, nonfinite = potentials_from(tilt(cfg.lam, reward - prev, where))
        log_w = refuse_overflow(state.log_weight + inc, state.log_weight, inc, lam=cfg.lam, where=where)
        log_w = ctx.guard_all_dead(log_w, info.k)
        tilted = tilt(cfg.lam, reward, where)
        log_mass = refuse_overflow(log_w + tilted, log_w, tilted, lam=cfg.lam, where=where)
        log_mass = ctx.guard_all_dead(potentials_from(log_mass)[0], info.k)
        outcome = selection.systematic(selection.normalize(log_mass), ctx.generator)
        new_log_w = (log_w - log_mass)[outcome.ancestors]
        state = replace(state, reward=reward, log_weight=log_w)
        state = gather(state, outcome.ancestors)
        # offspring of i carry w_i / m_i; 0/0 (a dead particle) stays dead
        state = replace(state, log_weight=torch.nan_to_num(new_log_w, nan=-float("inf")))
        state = state.with_aux(r_prev=state.reward.clone())
        ctx.lineage.record(info.k, outcome.ancestors)
        return state, plain_trace(info, state, cfg.lam, selected=True, ess=selection.ess(log_mass),
                                  dead_fraction=float(outcome.reborn.double().mean()), nonfinite_rewards=nonfinite)


def sample_vasr(denoiser, reward, config: VASRConfig, cond=None, progress: bool = False) -> SampleResult:
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc="vasr")

    def body() -> SampleResult:
        state = run_particle_loop(ctx, VASRPolicy(config))
        final_reward = ctx.evaluate_reward(state.x, None)
        prev = state.aux.get("r_prev", torch.zeros_like(final_reward))
        where = " on the final samples"
        inc = tilt(config.lam, final_reward - prev, where)
        log_w, _ = potentials_from(refuse_overflow(state.log_weight + inc, state.log_weight, inc, lam=config.lam,
                                                   where=where))
        state = replace(state, x0_hat=state.x, reward=final_reward, log_weight=log_w)
        extras = {}
        if config.final_selection:
            state, extras["final_dead_fraction"] = final_selection(ctx, state)
        return make_result(ctx, "vasr", state, state.reward, state.log_weight, extras)

    return run_with_cost(ctx, body)
