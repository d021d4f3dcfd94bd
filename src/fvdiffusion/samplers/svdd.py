"""SVDD-PM: soft value-based decoding with the posterior-mean value r(x̂0) (DESIGN.md §5).

At every step each particle draws M candidate next states from the run's transition (DDIM(η) by
default; any stochastic one, a multistep solver's history going with each candidate),
scores each by the reward at its Tweedie estimate x̂0 (one denoiser call per candidate, at
the next timestep) and keeps one candidate with probability softmax(λ r) (argmax when
λ = inf). The kept candidate's prediction *is* the next step's denoiser output, so it is
not computed twice. Particles never interact: there is no population selection.

Cost with N particles, K steps and M candidates (K ≥ 2):
    denoiser calls = N · (1 + M · (K − 1))      (N for x_T, then N·M candidates per step)
    reward calls   = N · M · (K − 1)
The last step t_1 → 0 is deterministic (σ = 0 because ᾱ_prev = 1), so it has no candidates,
and its output x0 is exactly the kept candidate's x̂0, whose reward is already known.
With K = 1 there is nothing to choose: N denoiser calls and N reward calls (the final samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# choosing among candidates lives in the engine (no sampler imports another); these names stay
# importable from here for compatibility
from fvdiffusion import selection
from fvdiffusion.candidates import choice_probabilities, draw_from, ess_fraction
from fvdiffusion.config import CommonConfig, check_int
from fvdiffusion.loop import Finished, RunContext, plain_trace
from fvdiffusion.population import ParticleState
from fvdiffusion.potentials import clean
from fvdiffusion.schedule import Prediction
from fvdiffusion.transitions import require_stochastic_transition


@dataclass(frozen=True)
class SVDDConfig(CommonConfig):
    """n_candidates: M next-state candidates per particle and step (M = 1 is the base sampler
    at M-fold cost). lam: softmax(λ r) over the candidates; inf = argmax, 0 = uniform. eta > 0."""

    n_candidates: int = 16

    allow_infinite_lambda = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_candidates", self.n_candidates, 1)
        require_stochastic_transition(self, "svdd")


class SVDDSampler:
    """M base-kernel candidates per particle and step, one kept by softmax(λ r(x̂0))."""

    def __init__(self, config: SVDDConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Finished:
        config = ctx.config
        n, m, lam = config.n_particles, config.n_candidates, config.lam
        sample_shape = tuple(ctx.denoiser.sample_shape)
        first = ctx.grid[0]
        x = ctx.initial_x()
        pred, dead = ctx.denoise(x, first.t, first.alpha_bar, config.num_steps)
        kept_reward = torch.full((n,), math.nan, dtype=torch.float64, device=ctx.device)
        ancestry: list[tuple[int, Tensor]] = []
        if dead is not None:
            x, pred, kept_reward, _ = _rebirth_killed(ctx, dead, x, pred, kept_reward, {}, ancestry,
                                                      config.num_steps, first.t)
        transition = ctx.transition
        history = transition.initial_history(x)
        for info in ctx.grid:
            if info.t_prev == -1:
                # σ = 0 on the last step: x0 = x̂0 of the kept candidate, every candidate would coincide
                x = transition.step(info, x, pred, history, None).x
                population = _population(x, pred, kept_reward)
                ctx.record(plain_trace(info, population, lam), info, population)
                break
            noise = ctx.randn((n * m, *sample_shape))  # one draw for the whole population
            moved = transition.step(info, x.repeat_interleave(m, dim=0),
                                    Prediction(x0=pred.x0.repeat_interleave(m, dim=0),
                                               eps=pred.eps.repeat_interleave(m, dim=0)),
                                    {key: h.repeat_interleave(m, dim=0) for key, h in history.items()}, noise)
            candidates = moved.x
            cand_pred, cand_dead = ctx.denoise(candidates, info.t_prev, info.alpha_bar_prev, info.k,
                                               what="candidates")
            cand_reward = ctx.rewards_where_alive(cand_pred.x0, info.k, cand_dead)
            values, nonfinite = clean(cand_reward.view(n, m))
            # killed candidates are never chosen; a particle whose candidates all died is reborn below
            exists = torch.ones(n, m, dtype=torch.bool, device=values.device) if cand_dead is None \
                else ~cand_dead.view(n, m)
            dead = None if cand_dead is None else ~exists.any(dim=1)
            if cand_dead is not None:
                nonfinite = nonfinite - cand_dead.sum()  # denoiser faults, not reward faults
                exists = exists | dead[:, None]
            probs = choice_probabilities(values, exists, lam, where=f" at step k={info.k}", checks=ctx.checks)
            rows = torch.arange(n, device=probs.device) * m + draw_from(probs, ctx.rand(n))
            dev_rows = rows.to(candidates.device)
            x = candidates[dev_rows]
            pred = Prediction(x0=cand_pred.x0[dev_rows], eps=cand_pred.eps[dev_rows])
            history = {key: h[dev_rows] for key, h in moved.history.items()}
            kept_reward = cand_reward[rows]
            if dead is not None and bool(dead.any()):
                x, pred, kept_reward, history = _rebirth_killed(ctx, dead, x, pred, kept_reward, history, ancestry, info.k,
                                                                info.t_prev, "candidates")
            population = _population(x, pred, kept_reward)
            ctx.record(plain_trace(info, population, lam, selected=m > 1, ess=ess_fraction(probs),
                                   nonfinite_rewards=nonfinite), info, population)
        rewards = kept_reward if config.num_steps > 1 else ctx.evaluate_reward(x, None)
        final = _population(x, pred, rewards)
        return Finished(final, {"n_candidates": m}, ancestry=tuple(ancestry))


def _rebirth_killed(ctx: RunContext, dead: Tensor, x: Tensor, pred: Prediction, reward: Tensor,
                    history: dict[str, Tensor], ancestry: list, k: int, t: int,
                    what: str = "particles") -> tuple[Tensor, Prediction, Tensor, dict[str, Tensor]]:
    """nonfinite_denoiser="kill": each dead particle becomes a copy of a uniformly drawn live one; the
    selection is appended to ``ancestry`` (the driver records it in the lineage)."""
    if bool(dead.all()):
        raise ctx.all_killed(k, t, dead.numel() if what == "particles" else dead.numel() * ctx.config.n_candidates,
                             what)
    # the engine's one kill rule; svdd's particles are unweighted, so the parent is a uniform live one
    ancestors = selection.REBIRTH_RULES["weighted"](torch.zeros(dead.numel(), dtype=torch.float64, device=dead.device),
                                                    dead, ctx.generator).ancestors
    ancestry.append((k, ancestors))
    dev = ancestors.to(x.device)
    return (x[dev], Prediction(x0=pred.x0[dev], eps=pred.eps[dev]), reward[ancestors],
            {key: h[dev] for key, h in history.items()})


def _population(x: Tensor, pred: Prediction, reward: Tensor) -> ParticleState:
    """The population as a ParticleState (for the trace and the result); particles keep their own roots."""
    n = x.shape[0]
    return ParticleState(x=x, x0_hat=pred.x0, eps_hat=pred.eps, reward=reward,
                         log_weight=torch.zeros(n, dtype=torch.float64, device=reward.device),
                         root=torch.arange(n, device=reward.device))


def svdd_cost(n_particles: int, num_steps: int, n_candidates: int) -> dict[str, int]:
    """The exact denoiser and reward calls of one svdd run (see the module docstring)."""
    if num_steps == 1:
        return {"denoiser_calls": n_particles, "reward_calls": n_particles}
    per_run = n_particles * n_candidates * (num_steps - 1)
    return {"denoiser_calls": n_particles + per_run, "reward_calls": per_run}
