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

from fvdiffusion import selection
from fvdiffusion.loop import (
    RunContext, StepInfo, plain_trace, potentials_from, refuse_overflow, run_particle_loop, run_with_cost, tilt,
)
from fvdiffusion.population import ParticleState, gather
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.common import final_selection, make_result
from fvdiffusion.samplers.config import (
    CommonConfig, SelectionScheduleMixin, check_choice, check_float, in_window,
)

SMC_POTENTIALS = ("diff", "max", "sum")


@dataclass(frozen=True)
class SMCConfig(SelectionScheduleMixin, CommonConfig):
    """potential: "diff" G = exp(λ(r_k − r_prev)), "max" G = exp(λ max_{s≥k} r_s), "sum"
    G = exp(λ Σ_{s≥k} r_s).  scheme: any resampling scheme of ``selection``.
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
        check_choice("potential", self.potential, SMC_POTENTIALS)
        check_choice("scheme", self.scheme, tuple(selection.SCHEMES))
        if self.ess_threshold is not None:
            check_float("ess_threshold", self.ess_threshold, 0.0, 1.0)


def _increment(cfg: SMCConfig, state: ParticleState, reward: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """log G_k for every particle, and the per-particle statistics the potential carries."""
    lam, where = cfg.lam, f" at step k={k}"
    if cfg.potential == "diff":
        prev = state.aux.get("r_prev", torch.zeros_like(reward))
        return tilt(lam, reward - prev, where), {"r_prev": reward}
    if cfg.potential == "max":
        running = torch.maximum(state.aux.get("r_max", torch.full_like(reward, -float("inf"))), reward)
        return tilt(lam, running, where), {"r_max": running}
    total = state.aux.get("r_sum", torch.zeros_like(reward)) + reward
    return tilt(lam, total, where), {"r_sum": total}


def resample(ctx: RunContext, state: ParticleState, scheme: str, k: int) -> tuple[ParticleState, float]:
    """Resample by the current log-weights with ``scheme``; weights become uniform."""
    log_w = ctx.guard_all_dead(state.log_weight, k)
    outcome = selection.get_scheme(scheme)(selection.normalize(log_w), ctx.generator)
    state = gather(state, outcome.ancestors)
    ctx.lineage.record(k, outcome.ancestors)
    state = replace(state, log_weight=torch.zeros_like(state.log_weight))
    return state, float(outcome.reborn.double().mean())


class SMCPolicy:
    def __init__(self, config: SMCConfig) -> None:
        self.config = config

    def __call__(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        if not in_window(cfg, info.index, cfg.num_steps):
            return state, plain_trace(info, state, cfg.lam, ess=selection.ess(state.log_weight))
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        inc, carried = _increment(cfg, state, reward, info.k)
        inc, nonfinite = potentials_from(inc)
        where = f" at step k={info.k}"
        log_g_sum = state.aux.get("log_g_sum", torch.zeros_like(reward))
        log_g = refuse_overflow(log_g_sum + inc, log_g_sum, inc, lam=cfg.lam, where=where)
        log_w = refuse_overflow(state.log_weight + inc, state.log_weight, inc, lam=cfg.lam, where=where)
        state = replace(state, reward=reward, log_weight=log_w)
        state = state.with_aux(log_g_sum=log_g, **carried)
        log_w_used = ctx.guard_all_dead(state.log_weight, info.k)
        ess = selection.ess(log_w_used)
        if cfg.ess_threshold is not None:
            do_resample = ess < cfg.ess_threshold
        else:
            do_resample = cfg.is_selection_step(info.index, cfg.num_steps)
        dead = 0.0
        if do_resample:
            state, dead = resample(ctx, state, cfg.scheme, info.k)
        return state, plain_trace(info, state, cfg.lam, selected=do_resample, ess=ess,
                                  dead_fraction=dead, nonfinite_rewards=nonfinite)


def final_correction(cfg: CommonConfig, state: ParticleState, final_reward: torch.Tensor) -> torch.Tensor:
    """Weights for p·exp(λ r(x0)): current weights × exp(λ r(x0) − Σ log G along the lineage)."""
    log_g = state.aux.get("log_g_sum", torch.zeros_like(final_reward))
    tilted = tilt(cfg.lam, final_reward, " on the final samples")
    corrected = refuse_overflow(state.log_weight + tilted - log_g, state.log_weight, tilted, log_g, lam=cfg.lam,
                                where=" on the final samples")
    return potentials_from(corrected)[0]


def sample_smc(denoiser, reward, config: SMCConfig, cond=None, progress: bool = False) -> SampleResult:
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc=f"smc-{config.scheme}")

    def body() -> SampleResult:
        state = run_particle_loop(ctx, SMCPolicy(config))
        final_reward = ctx.evaluate_reward(state.x, None)
        log_w = final_correction(config, state, final_reward)
        state = replace(state, x0_hat=state.x, reward=final_reward, log_weight=log_w)
        extras = {}
        if config.final_selection:
            state, extras["final_dead_fraction"] = final_selection(ctx, state)
        return make_result(ctx, "smc", state, state.reward, state.log_weight, extras)

    return run_with_cost(ctx, body)
