"""VASR: systematic resampling on the mass m_i ∝ w_i · exp(λ r_i), reweighted by w/m.

Resampling on m instead of w over-selects the currently best particles; the offspring of
particle i then carry weight w_i / m_i = exp(−λ r_i) (up to a constant), which keeps the
weighted population targeting p·exp(λ r). Weights follow the difference potential.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fvdiffusion import potentials, selection
from fvdiffusion.config import CommonConfig, SelectionScheduleMixin
from fvdiffusion.loop import FinalWeighting, RunContext, StepResult, plain_trace, select
from fvdiffusion.population import ParticleState
from fvdiffusion.schedule import StepInfo


@dataclass(frozen=True)
class VASRConfig(SelectionScheduleMixin, CommonConfig):
    """final_selection: equalise the final weights once more with the minimal-death rule."""

    final_selection: bool = True

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_schedule()


class VASRKernel:
    requires_final_reward = True

    def __init__(self, config: VASRConfig) -> None:
        self.config = config

    def init(self, ctx: RunContext, state: ParticleState) -> ParticleState:
        return state

    def _weights(self, ctx: RunContext, state: ParticleState, reward: torch.Tensor, where: str):
        """Weights after the difference increment λ(r − r_prev), and how many increments were not finite."""
        prev = state.aux.get("r_prev", torch.zeros_like(reward))
        inc, nonfinite = potentials.clean(potentials.tilt(self.config.lam, reward - prev, where, ctx.checks))
        return potentials.add(state.log_weight, inc, self.config.lam, where, ctx.checks), nonfinite

    def step(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        if not cfg.is_selection_step(info.index, cfg.num_steps):
            return StepResult(state, plain_trace(info, state, cfg.lam, ess=selection.ess_tensor(state.log_weight, False)))
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        where = potentials.at_step(info.k)
        log_w, nonfinite = self._weights(ctx, state, reward, where)
        log_z = potentials.log_z_increment(state.log_weight, log_w - _finite(state.log_weight))
        log_w = ctx.guard_all_dead(log_w, info.k)
        tilted = potentials.tilt(cfg.lam, reward, where, ctx.checks)
        log_mass = potentials.add(log_w, tilted, cfg.lam, where, ctx.checks)
        log_mass = ctx.guard_all_dead(potentials.clean(log_mass)[0], info.k)
        carried = log_w - log_mass  # computed before select(), which may overwrite log_w's rows in place
        state = replace(state, reward=reward, log_weight=log_w)
        mass = selection.normalize(log_mass, checked=False)
        state, outcome = select(ctx, state, mass, "systematic", info.k)
        # offspring of i carry w_i / m_i; 0/0 (a dead particle) stays dead
        new_log_w = carried[outcome.ancestors]
        state = replace(state, log_weight=torch.nan_to_num(new_log_w, nan=-float("inf")))
        state = state.with_aux(r_prev=state.reward.clone())
        trace = plain_trace(info, state, cfg.lam, selected=True, ess=selection.ess_tensor(log_mass, False),
                            dead_fraction=outcome.reborn.double().mean(), nonfinite_rewards=nonfinite,
                            offspring_var=selection.offspring_variance(mass, outcome.ancestors), log_z_increment=log_z)
        return StepResult(state, trace, outcome)

    def finish(self, ctx: RunContext, state: ParticleState) -> FinalWeighting:
        log_w, _ = self._weights(ctx, state, state.reward, potentials.FINAL)
        log_z = potentials.log_z_increment(state.log_weight, log_w - _finite(state.log_weight))
        state = replace(state, log_weight=potentials.clean(log_w)[0])
        if not self.config.final_selection:
            return FinalWeighting(state, log_z_increment=log_z)
        return FinalWeighting(state, log_w=state.log_weight, scheme="fleming_viot",
                              skip_if_uniform=True, log_z_increment=log_z)


def _finite(log_w: torch.Tensor) -> torch.Tensor:
    """log_w with −inf read as 0, so that log_w_new − _finite(log_w) is the increment where log_w is finite."""
    return torch.where(torch.isfinite(log_w), log_w, torch.zeros_like(log_w))
