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

from fvdiffusion import potentials, selection
from fvdiffusion.config import (
    CommonConfig, SelectionScheduleMixin, check_bool, check_choice, check_float, check_int,
)
from fvdiffusion.loop import FinalWeighting, RunContext, StepResult, plain_trace, select
from fvdiffusion.population import ParticleState
from fvdiffusion.schedule import StepInfo
from fvdiffusion.transitions import is_stochastic, restart_history

POTENTIALS = ("diff", "level")
PARENT_RULES = selection.PARENT_RULES
ALLOCATIONS = selection.ALLOCATIONS
REBIRTH_KERNELS = ("renoise", "langevin")
NU_SCHEDULES = ("constant", "decay", "grow")
# Chosen on real images (issue 19), by the rule declared in fvdiffusion/bench/fvd_defaults.py:
# the MNIST tuning grid (seed 0, classes 2/5/8, N = 128, K = 50; benchmarks/mnist_paper/*/tuning.md)
# ranks the kernel x allocation points by their worst FID ratio over the ae and evalnet spaces,
# and the exact-target suite (benchmarks/suite_v2) vetoes a point over 3x its grid's best anywhere.
# Results: benchmarks/fvd_defaults.md. DDPM: nu = 0.5 scaled by copies with the dead shared out
# systematically (1.32x the grid's best; the previous default, multinomial allocation, 1.91x).
# DDIM: nu = 1 scaled by copies with i.i.d. parent draws, as before (1.12x; systematic 4.39x:
# under a deterministic sampler the low-variance allocation lost on images).
DEFAULT_KERNEL_STOCHASTIC: dict[str, object] = {"rebirth": "renoise", "rebirth_noise": 0.5,
                                                "nu_schedule": "constant", "nu_by_copies": True}
DEFAULT_KERNEL_DDIM: dict[str, object] = {"rebirth": "renoise", "rebirth_noise": 1.0,
                                          "nu_schedule": "constant", "nu_by_copies": True}
# How the dead are shared out over the parents, per sampler type (None in the config = these).
DEFAULT_ALLOCATION_STOCHASTIC = "systematic"
DEFAULT_ALLOCATION_DDIM = "multinomial"
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
    parent_allocation: how the dead slots are shared out over the parents' birth mass once
      survival (always independent) has been drawn: "multinomial" (i.i.d. draws) or
      "systematic" (one shared offset: each parent gets ⌊D·m/M⌋ or ⌈D·m/M⌉ of the D dead,
      the same counts as residual-systematic). None = the default for the
      sampler type (DEFAULT_ALLOCATION_STOCHASTIC for a stochastic transition, DEFAULT_ALLOCATION_DDIM for a deterministic one).
    rebirth_noise: ν ∈ [0, 1]; 0 = exact clone, 1 = re-noise the parent's x̂0 afresh.
    The kernel fields (rebirth, rebirth_noise, nu_schedule, nu_by_copies) default to None:
      when all are unset the kernel chosen for the sampler type by the tuning suite applies
      (DEFAULT_KERNEL_STOCHASTIC for a stochastic transition (η > 0), DEFAULT_KERNEL_DDIM for a deterministic one); once any one is
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
    parent_allocation: str | None = None
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
        if self.parent_allocation is None:
            object.__setattr__(self, "parent_allocation",
                               DEFAULT_ALLOCATION_STOCHASTIC if is_stochastic(self) else DEFAULT_ALLOCATION_DDIM)
        check_choice("parent_allocation", self.parent_allocation, ALLOCATIONS)
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
            fill = DEFAULT_KERNEL_STOCHASTIC if is_stochastic(self) else DEFAULT_KERNEL_DDIM
        else:
            fill = NEUTRAL_KERNEL
        for name in unset:
            object.__setattr__(self, name, fill[name])


class FVDKernel:
    """The per-step birth–death move. The controller state (λ_prev, log κ, the selection count)
    lives in the population's scalars, so the kernel itself holds only the config."""

    requires_final_reward = True

    def __init__(self, config: FVDConfig) -> None:
        self.config = config

    def init(self, ctx: RunContext, state: ParticleState) -> ParticleState:
        return state.with_scalars(lam_prev=0.0, selections=0,
                                  log_kappa=torch.zeros((), dtype=torch.float64, device=state.log_weight.device))

    def potential(self, ctx: RunContext, state: ParticleState, reward: torch.Tensor, k: int):
        """κ · ℓ for every particle, cleaned (non-finite → −inf) and guarded (all −inf → uniform),
        and how many potentials were not finite."""
        where = potentials.at_step(k)
        r_prev = state.aux.get("r_prev", torch.zeros_like(reward))
        # λ_prev = 0 before the first selection, so r_prev's placeholder zeros never matter there
        ell = potentials.selection_potential(self.config.potential, self.config.lam, reward,
                                             state.scalars["lam_prev"], r_prev, where, ctx.checks)
        ell, nonfinite = potentials.clean(ell)
        kappa = torch.exp(state.scalars["log_kappa"])
        scaled = potentials.refuse_overflow(kappa * ell, ell, lam=self.config.lam,
                                            where=f"{where} (controller kappa)", checks=ctx.checks)
        return ctx.guard_all_dead(scaled, k), nonfinite

    def birth_death(self, ctx: RunContext, state: ParticleState, log_potential: torch.Tensor, k: int):
        """Select on ``log_potential``; returns the new state (controller updated) and the selection."""
        state, outcome = select(ctx, state, log_potential, self._scheme(), k, **self._scheme_options())
        state = state.with_aux(r_prev=state.reward.clone())
        dead = outcome.reborn.double().mean()
        selections = state.scalars["selections"] + 1
        log_kappa = state.scalars["log_kappa"]
        if self.config.target_dead_fraction is not None:
            gain = self.config.controller_gain / selections**0.6
            # bounded so that exp() cannot overflow: kappa in [e^-50, e^50] spans any useful scale
            log_kappa = (log_kappa + gain * (self.config.target_dead_fraction - dead)).clamp(-MAX_LOG_KAPPA,
                                                                                            MAX_LOG_KAPPA)
        state = state.with_scalars(lam_prev=self.config.lam, selections=selections, log_kappa=log_kappa)
        return state, outcome, dead

    def _scheme(self) -> str:
        return "fleming_viot"

    def _scheme_options(self) -> dict[str, str]:
        return {"parent_rule": self.config.parent_rule, "allocation": self.config.parent_allocation}

    def step(self, ctx: RunContext, info: StepInfo, state: ParticleState):
        cfg = self.config
        kappa_used = torch.exp(state.scalars["log_kappa"])
        if not cfg.is_selection_step(info.index, cfg.num_steps):
            return StepResult(state, plain_trace(info, state, cfg.lam, kappa=kappa_used))
        reward = ctx.evaluate_reward(state.x0_hat, info.k)
        state = replace(state, reward=reward)
        log_potential, nonfinite = self.potential(ctx, state, reward, info.k)
        log_z = potentials.log_z_increment(state.log_weight, log_potential)
        state, outcome, dead = self.birth_death(ctx, state, log_potential, info.k)
        state = self.rebirth(ctx, state, outcome, info)
        trace = plain_trace(info, state, cfg.lam, selected=True, ess=selection.ess_tensor(log_potential, False),
                            dead_fraction=dead, kappa=kappa_used, nonfinite_rewards=nonfinite,
                            offspring_var=selection.offspring_variance(log_potential, outcome.ancestors),
                            log_z_increment=log_z)
        return StepResult(state, trace, outcome)

    def finish(self, ctx: RunContext, state: ParticleState) -> FinalWeighting:
        extras = {"final_kappa": math.exp(float(state.scalars["log_kappa"]))}
        if not self.config.final_selection:  # log Ẑ: the normaliser of the last selection's target
            return FinalWeighting(state, extras=extras, log_z_increment=0.0)
        # at t = 0 a clone is an exact copy of its parent's sample (ᾱ = 1: no noise to refresh)
        log_potential, _ = self.potential(ctx, state, state.reward, 0)
        return FinalWeighting(state, log_w=log_potential, scheme=self._scheme(), scheme_options=self._scheme_options(),
                              report_ess=True, extras=extras,
                              log_z_increment=potentials.log_z_increment(state.log_weight, log_potential))

    def rebirth(self, ctx: RunContext, state: ParticleState, outcome: selection.Selection,
                info: StepInfo) -> ParticleState:
        """Make every reborn clone differ from its parent with the configured kernel."""
        if self.config.rebirth == "langevin":
            return self._langevin(ctx, state, outcome.reborn, info)
        nu = self._clone_nu(outcome, info)
        if nu is None:
            return state
        xi = ctx.particle_noise(tuple(state.x.shape[1:]))  # for every slot: the stream does not depend on who died
        nu = ctx.local(nu).to(state.x.device, state.x.dtype).reshape(-1, *([1] * (state.x.ndim - 1)))
        moved = ctx.local(outcome.reborn).to(state.x.device) & (nu.flatten() > 0)
        mask = moved.reshape(nu.shape)
        eps_new = torch.sqrt(1 - nu**2) * state.eps_hat + nu * xi
        eps = torch.where(mask, eps_new, state.eps_hat)
        x_new = math.sqrt(info.alpha_bar) * state.x0_hat + math.sqrt(1 - info.alpha_bar) * eps
        x = torch.where(mask, x_new, state.x)
        # a clone whose x_t moved is no longer on its parent's path: a multistep solver restarts it
        return replace(state, x=x, eps_hat=eps, history=restart_history(state.history, moved))

    def _clone_nu(self, outcome: selection.Selection, info: StepInfo) -> torch.Tensor | None:
        """ν for every slot (used only where reborn), or None when every clone gets ν = 0."""
        cfg = self.config
        tau = info.index / max(cfg.num_steps - 1, 1)
        scale = {"constant": 1.0, "decay": 1.0 - tau, "grow": tau}[cfg.nu_schedule]
        nu = cfg.rebirth_noise * scale
        if nu == 0.0:
            return None
        ancestors = outcome.ancestors
        per_slot = torch.full(ancestors.shape, nu, dtype=torch.float64, device=ancestors.device)
        if cfg.nu_by_copies:
            # copies of each parent (its own slot included), counted without a host read
            copies = torch.zeros(ancestors.numel(), dtype=torch.long, device=ancestors.device)
            copies = copies.index_add_(0, ancestors, torch.ones_like(ancestors))[ancestors]
            per_slot = per_slot * (1.0 - 1.0 / copies.double())
        return per_slot

    def _langevin(self, ctx: RunContext, state: ParticleState, reborn: torch.Tensor, info: StepInfo) -> ParticleState:
        """Unadjusted Langevin on p_t for the clones only; one denoiser call per clone per step.

        The clones' count decides the denoiser batch, so this kernel reads ``reborn`` on the host."""
        cfg = self.config
        xi_all = [ctx.particle_noise(tuple(state.x.shape[1:])) for _ in range(cfg.langevin_steps)]  # fixed stream
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
            history=restart_history(state.history, reborn.to(state.x.device)),
        )
