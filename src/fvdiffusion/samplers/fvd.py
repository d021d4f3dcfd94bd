"""Fleming–Viot Diffusion (DESIGN.md §4).

At each selection step every particle survives independently with probability
s_i = min(1, N·W_i); each dead slot is reborn as a copy of a survivor-parent drawn
∝ (N·W_j − 1)_+ and gets rebirth noise ε = √(1−ν²) ε̂_p + ν ξ, so the clone keeps its
parent's x̂0 but not its exact path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fvdiffusion import selection
from fvdiffusion.loop import (
    RunContext, StepInfo, plain_trace, potentials_from, refuse_overflow, run_particle_loop, run_with_cost, tilt,
)
from fvdiffusion.population import ParticleState, gather
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.common import make_result
from fvdiffusion.samplers.config import (
    CommonConfig, SelectionScheduleMixin, check_bool, check_choice, check_float, check_int,
)

POTENTIALS = ("diff", "level")
PARENT_RULES = ("excess", "weighted")
REBIRTH_KERNELS = ("renoise", "langevin")
NU_SCHEDULES = ("constant", "decay", "grow")
# Chosen by the declared tuning suite (fvdiffusion/bench/tuning_suite.py, benchmarks/suite/table.md):
# the rebirth kernel with the best worst-case error over its problems, per sampler type.
# Seed 0 of `fvd suite`: "nu0.5-copies" under DDPM (worst case 1.41x the grid's best over six
# problems), "nu1-copies" under DDIM (worst case 2.10x).
DEFAULT_KERNEL_STOCHASTIC: dict[str, object] = {"rebirth": "renoise", "rebirth_noise": 0.5,
                                                "nu_schedule": "constant", "nu_by_copies": True}
DEFAULT_KERNEL_DDIM: dict[str, object] = {"rebirth": "renoise", "rebirth_noise": 1.0,
                                          "nu_schedule": "constant", "nu_by_copies": True}
MAX_LOG_KAPPA = 50.0  # bound on the absorption controller's log kappa

# What an unset kernel field means once the user has set another one: the plain kernel.
NEUTRAL_KERNEL: dict[str, object] = {"rebirth": "renoise", "rebirth_noise": 0.0,
                                     "nu_schedule": "constant", "nu_by_copies": False}


@dataclass(frozen=True)
class FVDConfig(SelectionScheduleMixin, CommonConfig):
    """Every switch of FVD.

    potential: "diff" uses ℓ = λ r − λ_prev r_prev (the tilt added since the last
      selection), "level" uses ℓ = λ r.
    parent_rule: "excess" — survival min(1, N·W), parents ∝ (N·W − 1)_+ (fewest deaths);
      "weighted" — survival exp(ℓ − max ℓ), parents ∝ W (the killing rule).
    rebirth_noise: ν ∈ [0, 1]; 0 = exact clone, 1 = re-noise the parent's x̂0 afresh.
    The kernel fields (rebirth, rebirth_noise, nu_schedule, nu_by_copies) default to None:
      when all are unset the kernel chosen for the sampler type by the tuning suite applies
      (DEFAULT_KERNEL_STOCHASTIC for η > 0, DEFAULT_KERNEL_DDIM for η = 0); once any one is
      set, the unset ones take the plain values of NEUTRAL_KERNEL, so a user's kernel is
      exactly what they wrote.
    target_dead_fraction: α* of the absorption controller (None = off, κ = 1).
    controller_gain: γ_0 of the Robbins–Monro step γ_j = γ_0 / j^0.6.
    final_selection: one more birth–death on r(x0) after the last step.

    Rebirth kernels (how a clone is made to differ from its parent; docs/method.md has the
    measured comparison):
    rebirth: "renoise" — ε = √(1−ν²) ε̂_p + ν ξ around the parent's x̂0 (no extra calls;
      biased: x̂0 is a posterior mean, so the reborn x_t is under-dispersed);
      "langevin" — the clone starts at the parent's x_t and takes ``langevin_steps``
      unadjusted Langevin steps on the model's score at t (step δ = langevin_step·(1−ᾱ_t)),
      which leave p_t approximately invariant; the first step uses the parent's cached
      score and every step ends with one denoiser call per clone (counted in the cost).
    nu_schedule: how ν varies over the trajectory (τ = 0 at the first step, 1 at the last):
      "constant" ν, "decay" ν·(1−τ) (full noise early, none at the end), "grow" ν·τ.
    nu_by_copies: scale each clone's ν by (1 − 1/c), c = the copies of its parent at this
      step (the parent's own slot included): a parent copied once gives ν/2, many times ≈ ν.
    """

    potential: str = "diff"
    parent_rule: str = "excess"
    rebirth_noise: float | None = None
    target_dead_fraction: float | None = None
    controller_gain: float = 1.0
    final_selection: bool = True
    rebirth: str | None = None
    nu_schedule: str | None = None
    nu_by_copies: bool | None = None
    langevin_steps: int = 1
    langevin_step: float = 0.2

    def __post_init__(self) -> None:
        CommonConfig.__post_init__(self)
        self._check_schedule()
        check_choice("potential", self.potential, POTENTIALS)
        check_choice("parent_rule", self.parent_rule, PARENT_RULES)
        self._resolve_kernel()
        check_choice("rebirth", self.rebirth, REBIRTH_KERNELS)
        check_choice("nu_schedule", self.nu_schedule, NU_SCHEDULES)
        check_bool("nu_by_copies", self.nu_by_copies)
        check_bool("final_selection", self.final_selection)
        check_int("langevin_steps", self.langevin_steps, 1)
        check_float("langevin_step", self.langevin_step, 0.0, 1.0)
        check_float("rebirth_noise", self.rebirth_noise, 0.0, 1.0)
        if self.target_dead_fraction is not None:
            check_float("target_dead_fraction", self.target_dead_fraction, 0.0, 1.0)
        check_float("controller_gain", self.controller_gain, 0.0)

    def _resolve_kernel(self) -> None:
        unset = [name for name in NEUTRAL_KERNEL if getattr(self, name) is None]
        if len(unset) == len(NEUTRAL_KERNEL):
            fill = DEFAULT_KERNEL_STOCHASTIC if self.eta > 0 else DEFAULT_KERNEL_DDIM
        else:
            fill = NEUTRAL_KERNEL
        for name in unset:
            object.__setattr__(self, name, fill[name])


class FVDPolicy:
    """The per-step birth–death move; holds the scalar controller state (λ_prev, log κ)."""

    def __init__(self, config: FVDConfig) -> None:
        self.config = config
        self.lam_prev = 0.0
        self.log_kappa = 0.0
        self.selections = 0

    def potential(self, reward: torch.Tensor, r_prev: torch.Tensor, k: int) -> torch.Tensor:
        lam, where = self.config.lam, f" at step k={k}" if k else " on the final samples"
        if self.config.potential == "level":
            return tilt(lam, reward, where)
        # λ_prev = 0 before the first selection, so r_prev's NaN-free zeros never matter there
        now, before = tilt(lam, reward, where), tilt(self.lam_prev, r_prev, where)
        return refuse_overflow(now - before, now, before, lam=lam, where=where)

    def birth_death(self, ctx: RunContext, state: ParticleState, reward: torch.Tensor, k: int):
        """Select on the potential of ``reward``; returns the new state and the step statistics."""
        r_prev = state.aux.get("r_prev", torch.zeros_like(reward))
        log_potential, nonfinite = potentials_from(self.potential(reward, r_prev, k))
        kappa = math.exp(self.log_kappa)
        log_potential = refuse_overflow(kappa * log_potential, log_potential, lam=self.config.lam,
                                        where=f" at step k={k} (controller kappa={kappa:.3g})")
        log_potential = ctx.guard_all_dead(log_potential, k)
        outcome = selection.fleming_viot(log_potential, ctx.generator, parent_rule=self.config.parent_rule)
        state = replace(state, reward=reward)
        state = gather(state, outcome.ancestors)
        state = state.with_aux(r_prev=state.reward.clone())
        ctx.lineage.record(k, outcome.ancestors)
        self.lam_prev = self.config.lam
        dead = float(outcome.reborn.double().mean())
        self.selections += 1
        if self.config.target_dead_fraction is not None:
            gain = self.config.controller_gain / self.selections**0.6
            # bounded so that exp() cannot overflow: kappa in [e^-50, e^50] spans any useful scale
            self.log_kappa = min(MAX_LOG_KAPPA, max(-MAX_LOG_KAPPA,
                                 self.log_kappa + gain * (self.config.target_dead_fraction - dead)))
        return state, outcome, selection.ess(log_potential), dead, nonfinite

    def __call__(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        if not cfg.is_selection_step(info.index, cfg.num_steps):
            return state, plain_trace(info, state, cfg.lam, kappa=math.exp(self.log_kappa))
        kappa_used = math.exp(self.log_kappa)
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        state, outcome, ess, dead, nonfinite = self.birth_death(ctx, state, reward, info.k)
        state = self.rebirth(ctx, state, outcome, info)
        return state, plain_trace(info, state, cfg.lam, selected=True, ess=ess, dead_fraction=dead,
                                  kappa=kappa_used, nonfinite_rewards=nonfinite)

    def rebirth(self, ctx: RunContext, state: ParticleState, outcome: selection.Selection,
                info: StepInfo) -> ParticleState:
        """Make every reborn clone differ from its parent with the configured kernel."""
        if self.config.rebirth == "langevin":
            return self._langevin(ctx, state, outcome.reborn, info)
        nu = self._clone_nu(outcome, info)
        if nu is None:
            return state
        xi = ctx.randn(tuple(state.x.shape))  # drawn for all N so the stream does not depend on who died
        nu = nu.to(state.x.device, state.x.dtype).reshape(-1, *([1] * (state.x.ndim - 1)))
        mask = outcome.reborn.to(state.x.device).reshape(nu.shape)
        eps_new = torch.sqrt(1 - nu**2) * state.eps_hat + nu * xi
        eps = torch.where(mask, eps_new, state.eps_hat)
        x_new = math.sqrt(info.alpha_bar) * state.x0_hat + math.sqrt(1 - info.alpha_bar) * eps
        x = torch.where(mask, x_new, state.x)
        return replace(state, x=x, eps_hat=eps)

    def _clone_nu(self, outcome: selection.Selection, info: StepInfo) -> torch.Tensor | None:
        """ν for every slot (used only where reborn), or None when every clone gets ν = 0."""
        cfg = self.config
        tau = info.index / max(cfg.num_steps - 1, 1)
        scale = {"constant": 1.0, "decay": 1.0 - tau, "grow": tau}[cfg.nu_schedule]
        nu = cfg.rebirth_noise * scale
        if nu == 0.0:
            return None
        per_slot = torch.full(outcome.ancestors.shape, nu, dtype=torch.float64)
        if cfg.nu_by_copies:
            copies = torch.bincount(outcome.ancestors, minlength=outcome.ancestors.numel())[outcome.ancestors]
            per_slot = per_slot * (1.0 - 1.0 / copies.double())
        return per_slot

    def _langevin(self, ctx: RunContext, state: ParticleState, reborn: torch.Tensor, info: StepInfo) -> ParticleState:
        """Unadjusted Langevin on p_t for the clones only; one denoiser call per clone per step."""
        cfg = self.config
        xi_all = [ctx.randn(tuple(state.x.shape)) for _ in range(cfg.langevin_steps)]  # fixed stream
        rows = torch.nonzero(reborn).flatten().to(state.x.device)
        if rows.numel() == 0 or info.alpha_bar >= 1.0:
            return state
        sigma = math.sqrt(1 - info.alpha_bar)
        delta = cfg.langevin_step * sigma**2
        x, eps, x0 = state.x[rows], state.eps_hat[rows], state.x0_hat[rows]
        for xi in xi_all:
            # score of p_t is −ε̂/σ: x ← x + δ·score + √(2δ)·ξ
            x_new = x - delta / sigma * eps + math.sqrt(2 * delta) * xi[rows]
            pred, dead = ctx.denoise(x_new, info.t, info.alpha_bar, info.k, what="Langevin moves")
            if dead is None:
                x, eps, x0 = x_new, pred.eps, pred.x0
            else:  # nonfinite_denoiser="kill": a move whose output is NaN/inf is rejected, the clone stays put
                stay = dead.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
                x, eps, x0 = (torch.where(stay, old, new) for old, new in ((x, x_new), (eps, pred.eps), (x0, pred.x0)))
        return replace(
            state,
            x=state.x.index_copy(0, rows, x),
            x0_hat=state.x0_hat.index_copy(0, rows, x0),
            eps_hat=state.eps_hat.index_copy(0, rows, eps),
        )


def sample_fvd(denoiser, reward, config: FVDConfig, cond=None, progress: bool = False) -> SampleResult:
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc="fvd")
    policy = FVDPolicy(config)

    def body() -> SampleResult:
        state = run_particle_loop(ctx, policy)
        final_reward = ctx.evaluate_reward(state.x, None)
        state = replace(state, x0_hat=state.x, reward=final_reward)
        extras = {"final_kappa": math.exp(policy.log_kappa)}
        if config.final_selection:
            # at t = 0 a clone is an exact copy of its parent's sample (ᾱ = 1: no noise to refresh)
            state, _, ess, dead, _ = policy.birth_death(ctx, state, final_reward, 0)
            extras.update(final_ess=ess, final_dead_fraction=dead)
        return make_result(ctx, "fvd", state, state.reward, torch.zeros(config.n_particles, dtype=torch.float64), extras)

    return run_with_cost(ctx, body)
