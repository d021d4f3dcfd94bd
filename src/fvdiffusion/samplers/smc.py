"""Sequential Monte Carlo / Feynman–Kac steering with interchangeable resampling schemes.

Weights are updated at every step of the selection window by the potential increment
log G_k; particles are resampled on the selection schedule (every ``selection_interval``
steps) or, when ``ess_threshold`` is set, whenever ESS/N falls below it. Each particle
carries Σ log G along its lineage so the final correction λ r(x0) − Σ log G makes the
target p·exp(λ r(x0)) for every potential (for "diff" the sum telescopes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fvdiffusion import potentials, selection
from fvdiffusion.config import CommonConfig, SelectionScheduleMixin, check_choice, check_float, in_window
from fvdiffusion.loop import FinalWeighting, RunContext, StepResult, plain_trace, select
from fvdiffusion.population import ParticleState
from fvdiffusion.schedule import StepInfo

SMC_POTENTIALS = ("diff", "max", "sum", "rt")
# FK steering's name for the running sum (fkd_class.py at 9413005: r + population_rs, both summed)
POTENTIAL_ALIASES = {"add": "sum"}


@dataclass(frozen=True)
class SMCConfig(SelectionScheduleMixin, CommonConfig):
    """potential: "diff" G = exp(λ(r_k − r_prev)), "max" G = exp(λ max_{s≥k} r_s), "sum"
    G = exp(λ Σ_{s≥k} r_s) ("add", FK steering's name, is read as "sum"), "rt" G = exp(λ r_k).
    scheme: any resampling scheme of ``selection``.
    ess_threshold: resample when ESS/N < threshold (None = resample on the schedule).
    final_selection: equalise the corrected final weights once more, with the minimal-death
    rule whatever ``scheme`` is (it never duplicates samples when the weights are uniform)."""

    potential: str = "diff"
    scheme: str = "multinomial"
    ess_threshold: float | None = None
    final_selection: bool = True

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_schedule()
        if isinstance(self.potential, str) and self.potential in POTENTIAL_ALIASES:
            # the resolved config (and the process-group fingerprint) records the one canonical name
            object.__setattr__(self, "potential", POTENTIAL_ALIASES[self.potential])
        check_choice("potential", self.potential, SMC_POTENTIALS)
        check_choice("scheme", self.scheme, tuple(selection.SCHEMES))
        if self.ess_threshold is not None:
            check_float("ess_threshold", self.ess_threshold, 0.0, 1.0)


def resample(ctx: RunContext, state: ParticleState, scheme: str,
             k: int) -> tuple[ParticleState, selection.Selection, torch.Tensor]:
    """Resample by the current log-weights with ``scheme``; weights become uniform.

    Returns the new state, the selection and the offspring-count variance of the draw."""
    log_w = selection.normalize(ctx.guard_all_dead(state.log_weight, k), checked=False)
    state, outcome = select(ctx, state, log_w, scheme, k)
    state = replace(state, log_weight=torch.zeros_like(state.log_weight))
    return state, outcome, selection.offspring_variance(log_w, outcome.ancestors)


class SMCKernel:
    requires_final_reward = True

    def __init__(self, config: SMCConfig) -> None:
        self.config = config

    def init(self, ctx: RunContext, state: ParticleState) -> ParticleState:
        return state

    def step(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        if not in_window(cfg, info.index, cfg.num_steps):
            return StepResult(state, plain_trace(info, state, cfg.lam, ess=selection.ess_tensor(state.log_weight, False)))
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        where = potentials.at_step(info.k)
        increment = potentials.smc_increment(cfg.potential, cfg.lam, state.aux, reward, where, ctx.checks)
        inc, nonfinite = potentials.clean(increment.log_g)
        log_g_sum = state.aux.get("log_g_sum", torch.zeros_like(reward))
        log_g = potentials.add(log_g_sum, inc, cfg.lam, where, ctx.checks)
        log_w = potentials.add(state.log_weight, inc, cfg.lam, where, ctx.checks)
        log_z = potentials.log_z_increment(state.log_weight, inc)
        state = replace(state, reward=reward, log_weight=log_w)
        state = state.with_aux(log_g_sum=log_g, **increment.carried)
        log_w_used = ctx.guard_all_dead(state.log_weight, info.k)
        ess = selection.ess_tensor(log_w_used, False)
        if cfg.ess_threshold is not None:
            do_resample = bool(ess < cfg.ess_threshold)  # a data-dependent decision: one host read per step
        else:
            do_resample = cfg.is_selection_step(info.index, cfg.num_steps)
        dead, spread, outcome = 0.0, 0.0, None
        if do_resample:
            state, outcome, spread = resample(ctx, state, cfg.scheme, info.k)
            dead = outcome.reborn.double().mean()
        return StepResult(state, plain_trace(info, state, cfg.lam, selected=do_resample, ess=ess, dead_fraction=dead,
                                             nonfinite_rewards=nonfinite, offspring_var=spread, log_z_increment=log_z),
                          outcome)

    def finish(self, ctx: RunContext, state: ParticleState) -> FinalWeighting:
        """Weights for p·exp(λ r(x0)), then (optionally) the minimal-death equalisation."""
        log_g = state.aux.get("log_g_sum", torch.zeros_like(state.reward))
        log_w = potentials.terminal_correction(self.config.lam, state.log_weight, log_g, state.reward, ctx.checks)
        finite_before = torch.where(torch.isfinite(state.log_weight), state.log_weight, torch.zeros_like(log_w))
        log_z = potentials.log_z_increment(state.log_weight, log_w - finite_before)
        state = replace(state, log_weight=log_w)
        if not self.config.final_selection:
            return FinalWeighting(state, log_z_increment=log_z)
        return FinalWeighting(state, log_w=log_w, scheme="fleming_viot", skip_if_uniform=True, log_z_increment=log_z)
