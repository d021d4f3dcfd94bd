"""The thin denoising loop shared by the particle methods, with cost counting.

A particle method is the loop plus a *policy*: after the denoiser call of every step the
policy may evaluate rewards, reweight, select and copy particles; the loop then takes the
DDIM(η) step for the whole population. Randomness comes from one generator seeded by the
config, and every noise tensor is drawn for the whole population at once, so micro-batching
the denoiser or the reward cannot change a result.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.population import ParticleState, gather, initial_state
from fvdiffusion.result import Cost, Lineage, StepTrace
from fvdiffusion.rewards.base import Reward
from fvdiffusion.samplers.config import CommonConfig, ConfigError
from fvdiffusion.schedule import Prediction, ddim_step, to_x0_eps


class RewardError(RuntimeError):
    """The reward raised or returned something the engine cannot use."""


class DenoiserError(ValueError):
    """The denoiser raised, returned the wrong shape, or returned NaN/inf; the message names the step."""


class NonFiniteRewardWarning(RuntimeWarning):
    """Some rewards of a run were NaN/±inf; those particles got zero weight. Issued once per run."""


class AllParticlesDeadWarning(NonFiniteRewardWarning):
    """At one or more steps every particle had potential −inf; weights were reset to uniform there."""


class NonFiniteDenoiserWarning(RuntimeWarning):
    """With nonfinite_denoiser="kill", some denoiser outputs were NaN/±inf and those particles were
    killed (reborn as copies of survivors). Issued once per run, with the counts."""


@dataclass
class RunHealth:
    """What went wrong quietly during a run, summed so it can be reported once at the end."""

    reward_values: int = 0          # rewards evaluated (rows)
    nonfinite_rewards: int = 0      # of those, NaN or ±inf
    all_dead_steps: set[int] = field(default_factory=set)  # steps k where every weight was −inf
    denoiser_values: int = 0        # denoiser outputs (rows)
    nonfinite_denoiser: int = 0     # of those, with a NaN or ±inf entry (killed under nonfinite_denoiser="kill")

    def as_dict(self) -> dict[str, Any]:
        return {"reward_values": self.reward_values, "nonfinite_rewards": self.nonfinite_rewards,
                "all_dead_steps": sorted(self.all_dead_steps, reverse=True),
                "denoiser_values": self.denoiser_values, "nonfinite_denoiser": self.nonfinite_denoiser}

    def warn_once(self, method: str) -> None:
        """One summary warning per kind of fault for the whole run (never one per step)."""
        if self.nonfinite_denoiser:
            warnings.warn(f"{method}: {self.nonfinite_denoiser} of {self.denoiser_values} denoiser outputs were "
                          f"non-finite (NaN/inf) and were dropped (nonfinite_denoiser='kill': those particles "
                          f"died and were reborn as copies of survivors)", NonFiniteDenoiserWarning, stacklevel=5)
        if not self.nonfinite_rewards and not self.all_dead_steps:
            return
        message = (f"{method}: {self.nonfinite_rewards} of {self.reward_values} reward values were "
                   f"non-finite (NaN/inf); those particles got zero weight")
        if self.all_dead_steps:
            steps = sorted(self.all_dead_steps, reverse=True)
            shown = ", ".join(str(k) for k in steps[:5]) + (", ..." if len(steps) > 5 else "")
            message += (f"; at {len(steps)} step(s) every particle had zero weight and the run "
                        f"continued with uniform weights (k = {shown}; k = 0 is the final selection)")
            warnings.warn(message, AllParticlesDeadWarning, stacklevel=5)
        else:
            warnings.warn(message, NonFiniteRewardWarning, stacklevel=5)


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: step k (K … 1), its position 0 … K−1, its timestep and ᾱ values."""

    k: int
    index: int
    t: int
    alpha_bar: float
    alpha_bar_prev: float


@dataclass
class RunContext:
    """Everything a policy needs besides the population; owns the cost counters."""

    denoiser: Denoiser
    reward: Reward | None
    config: CommonConfig
    cond: Any = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cost: Cost = field(default_factory=Cost)
    lineage: Lineage | None = None
    trace: list[StepTrace] = field(default_factory=list)
    progress: Any = None  # a tqdm bar or None
    health: RunHealth = field(default_factory=RunHealth)

    @classmethod
    def create(cls, denoiser: Denoiser, reward: Reward | None, config: CommonConfig, cond: Any = None,
               progress: bool = False, desc: str = "") -> "RunContext":
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        ctx = cls(denoiser=denoiser, reward=reward, config=config, cond=cond, generator=generator,
                  device=_device_of(denoiser))
        ctx.lineage = Lineage(n_particles=config.n_particles, num_steps=config.num_steps)
        if progress:
            from tqdm.auto import tqdm

            ctx.progress = tqdm(total=config.num_steps, desc=desc or "denoising", leave=False)
        return ctx

    # --- randomness -------------------------------------------------------------------
    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Gaussian noise for a whole population, drawn on the CPU generator (device-independent)."""
        return torch.randn(shape, generator=self.generator, dtype=dtype).to(self.device)

    def rand(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    # --- model calls -------------------------------------------------------------------
    def denoise(self, x: Tensor, t: int, alpha_bar: float, k: int | None = None,
                what: str = "particles") -> tuple[Prediction, Tensor | None]:
        """One denoiser evaluation per row of x, micro-batched: (x̂0, ε̂) and the rows to kill.

        Every sampler calls the denoiser here, so faults are caught at their source: an
        exception, a wrong shape or a NaN/±inf output raises :class:`DenoiserError` naming the
        step. Under ``nonfinite_denoiser="kill"`` the rows whose output is not finite are
        returned instead (None when all are finite, the usual case), counted in the run's
        health; the caller kills them, and raises :meth:`all_killed` if no particle is left.
        """
        where = f"at step k={k} (t={t})" if k is not None else f"at t={t}"
        outputs = []
        for chunk in _chunks(x, self.config.batch_size):
            t_batch = torch.full((chunk.shape[0],), t, dtype=torch.long, device=chunk.device)
            try:
                out = self.denoiser(chunk, t_batch, self.cond)
            except Exception as exc:  # keep the original as __cause__, add where it happened
                raise DenoiserError(f"denoiser raised {where}: {_one_line(exc)}") from exc
            if not isinstance(out, Tensor):
                raise DenoiserError(f"denoiser must return a torch.Tensor, got {type(out).__name__} {where}")
            if out.shape != chunk.shape:
                raise DenoiserError(f"denoiser returned shape {tuple(out.shape)}, expected {tuple(chunk.shape)} "
                                    f"{where}")
            outputs.append(out)
            self.cost.denoiser_calls += chunk.shape[0]
        model_output = torch.cat(outputs)
        self.health.denoiser_values += model_output.shape[0]
        # One reduction over the whole call and one host sync (the bool) per denoiser call;
        # the per-row mask is only computed on the rare failure.
        dead = None
        if not bool(torch.isfinite(model_output).all()):
            dead = (~torch.isfinite(model_output.reshape(model_output.shape[0], -1)).all(dim=1)).cpu()
            count = int(dead.sum())
            if self.config.nonfinite_denoiser == "raise":
                raise DenoiserError(f"denoiser returned NaN/inf {where} for {count} of {dead.numel()} {what}; "
                                    f"set nonfinite_denoiser='kill' to drop those particles instead")
            self.health.nonfinite_denoiser += count
        return to_x0_eps(model_output, x, alpha_bar, self.denoiser.prediction_type), dead

    def all_killed(self, k: int, t: int, total: int, what: str = "particles") -> DenoiserError:
        """The error for a step where killing the non-finite outputs left no particle alive."""
        return DenoiserError(f"denoiser returned NaN/inf at step k={k} (t={t}) for all {total} {what}: "
                             f"nonfinite_denoiser='kill' left none alive")

    def rewards_where_alive(self, x0: Tensor, k: int | None, dead: Tensor | None) -> Tensor:
        """r(x0) for the rows the denoiser got right; NaN for killed rows (counted as denoiser, not reward, faults)."""
        if dead is None:
            return self.evaluate_reward(x0, k)
        rewards = torch.full((x0.shape[0],), float("nan"), dtype=torch.float64)
        alive = ~dead
        if bool(alive.any()):
            rewards[alive] = self.evaluate_reward(x0[alive.to(x0.device)], k)
        return rewards

    def evaluate_reward(self, x0: Tensor, k: int | None) -> Tensor:
        """r(x0) for every row, micro-batched, as float64 [N]; validated at every call."""
        if self.reward is None:
            raise RewardError("this method needs a reward, but reward=None was given")
        where = f"at step k={k}" if k is not None else "on the final samples"
        values = []
        for chunk in _chunks(x0, self.config.batch_size):
            try:
                r = self.reward(chunk, self.cond)
            except Exception as exc:  # keep the original as __cause__, add where it happened
                raise RewardError(f"reward raised {where}: {_one_line(exc)}") from exc
            if not isinstance(r, Tensor):
                raise RewardError(f"reward must return a torch.Tensor of shape ({chunk.shape[0]},), got {type(r).__name__}")
            if r.shape != (chunk.shape[0],):
                raise RewardError(
                    f"reward returned shape {tuple(r.shape)}, expected ({chunk.shape[0]},) {where}"
                )
            if not torch.is_floating_point(r):
                raise RewardError(f"reward returned dtype {r.dtype}, expected a floating dtype {where}")
            values.append(r.detach().to("cpu", torch.float64))
            self.cost.reward_calls += chunk.shape[0]
        rewards = torch.cat(values)
        self.health.reward_values += rewards.numel()
        self.health.nonfinite_rewards += int((~torch.isfinite(rewards)).sum())
        return rewards

    def guard_all_dead(self, log_w: Tensor, k: int | None) -> Tensor:
        """If every weight is −inf, continue with uniform weights; counted for the run's one warning."""
        if torch.isneginf(log_w).all():
            self.health.all_dead_steps.add(0 if k is None else k)
            return torch.zeros_like(log_w)
        return log_w

    # --- bookkeeping -------------------------------------------------------------------
    def record(self, trace: StepTrace) -> None:
        self.trace.append(trace)
        if self.progress is not None:
            self.progress.update(1)
            post = {"ess": f"{trace.ess:.2f}", "dead": f"{trace.dead_fraction:.2f}"}
            if trace.reward_mean == trace.reward_mean:
                post["r"] = f"{trace.reward_mean:.3g}"
            self.progress.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _device_of(denoiser: Denoiser) -> torch.device:
    dev = getattr(denoiser, "device", None)
    if dev is not None:
        return torch.device(dev)
    module = getattr(denoiser, "module", None)
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _one_line(exc: Exception) -> str:
    """``Type: message`` on one line (the full exception stays attached as __cause__)."""
    lines = str(exc).strip().splitlines()
    more = " ..." if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0] if lines else ''}{more}"


def _chunks(x: Tensor, batch_size: int | None):
    if batch_size is None or batch_size >= x.shape[0]:
        yield x
        return
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def potentials_from(log_potential: Tensor) -> tuple[Tensor, int]:
    """Map NaN/±inf potentials to −inf (the particle dies); returns (clean, how many were bad)."""
    bad = ~torch.isfinite(log_potential)
    return torch.where(bad, torch.full_like(log_potential, -float("inf")), log_potential), int(bad.sum())


def refuse_overflow(result: Tensor, *inputs: Tensor, lam: float, where: str = "") -> Tensor:
    """``result`` (computed from ``inputs`` and λ) unless a row with finite inputs came out ±inf/NaN.

    That is float64 overflow of λ·r: with λ = 1e308 every potential was ±inf, so every particle
    "died" and the run silently equalled λ = 0. It is refused with an error naming lam. The
    tensors are [N] float64 rewards and weights on the CPU, so the check costs no device sync.
    """
    finite_inputs = torch.isfinite(inputs[0])
    for other in inputs[1:]:
        finite_inputs = finite_inputs & torch.isfinite(other)
    overflow = finite_inputs & ~torch.isfinite(result)
    if bool(overflow.any()):
        largest = max(float(value[finite_inputs].abs().max()) for value in inputs)
        raise ConfigError(f"invalid lam={lam!r}: lam x reward overflows float64{where} for {int(overflow.sum())} "
                          f"of {overflow.numel()} finite values (largest input magnitude {largest:.3g}); "
                          f"use a smaller lam or rescale the reward")
    return result


def tilt(lam: float, value: Tensor, where: str = "") -> Tensor:
    """λ · value: where λ meets a reward statistic, with float64 overflow refused (see refuse_overflow)."""
    return refuse_overflow(lam * value, value, lam=lam, where=where)


def reward_stats(reward: Tensor) -> tuple[float, float]:
    finite = reward[torch.isfinite(reward)]
    if finite.numel() == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.max())


def plain_trace(info: StepInfo, state: ParticleState, lam: float, **overrides: Any) -> StepTrace:
    """A trace row with the population statistics filled in; callers override what they changed."""
    mean, best = reward_stats(state.reward)
    values = dict(
        step=info.k, t=info.t, selected=False, ess=1.0, dead_fraction=0.0, lam=lam, kappa=1.0,
        distinct_roots=int(state.root.unique().numel()), reward_mean=mean, reward_max=best,
        nonfinite_rewards=0,
    )
    values.update(overrides)
    return StepTrace(**values)


class StepPolicy(Protocol):
    def __call__(self, ctx: RunContext, info: StepInfo, state: ParticleState) -> tuple[ParticleState, StepTrace]: ...


def run_particle_loop(ctx: RunContext, policy: StepPolicy, x_init: Tensor | None = None) -> ParticleState:
    """Denoise N particles from pure noise to t = 0, letting ``policy`` act after each denoiser call."""
    cfg = ctx.config
    schedule = ctx.denoiser.schedule
    shape = (cfg.n_particles, *ctx.denoiser.sample_shape)
    x = ctx.randn(shape) if x_init is None else x_init
    state = initial_state(x)
    timesteps = schedule.timesteps(cfg.num_steps).tolist()
    for index, t in enumerate(timesteps):
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        info = StepInfo(
            k=cfg.num_steps - index, index=index, t=t,
            alpha_bar=float(schedule.alpha_bar(t)), alpha_bar_prev=float(schedule.alpha_bar(t_prev)),
        )
        pred, dead = ctx.denoise(state.x, t, info.alpha_bar, info.k)
        state = replace(state, x0_hat=pred.x0, eps_hat=pred.eps)
        if dead is not None:
            if bool(dead.all()):
                raise ctx.all_killed(info.k, t, state.n)
            state = rebirth_killed(ctx, state, dead, info.k)
        state, trace = policy(ctx, info, state)
        noise = ctx.randn(shape) if cfg.eta > 0 else None
        x_prev = ddim_step(state.x0_hat, state.eps_hat, info.alpha_bar, info.alpha_bar_prev, cfg.eta, noise)
        state = replace(state, x=x_prev)
        ctx.record(trace)
    return state


def rebirth_killed(ctx: RunContext, state: ParticleState, dead: Tensor, k: int) -> ParticleState:
    """Replace every killed particle by a copy of a survivor drawn ∝ its weight (recorded in the lineage).

    The copy gets the survivors' mean weight, so the weighted population still estimates what
    the survivors estimate. It is an exact copy (no rebirth noise): a fault path, not a move.
    """
    alive = ~dead
    log_w = state.log_weight[alive]
    if bool(torch.isneginf(log_w).all()):
        log_w = torch.zeros_like(log_w)
    parents_alive = torch.multinomial(torch.softmax(log_w, dim=0), int(dead.sum()), replacement=True,
                                      generator=ctx.generator)
    ancestors = torch.arange(state.n)
    ancestors[dead] = torch.nonzero(alive).flatten()[parents_alive]
    mean_log_w = torch.logsumexp(log_w, dim=0) - math.log(log_w.numel())
    state = gather(state, ancestors)
    state = replace(state, log_weight=torch.where(dead, mean_log_w, state.log_weight))
    ctx.lineage.record(k, ancestors)
    return state


class Timer:
    """Wall time and peak memory of a run, written into the cost at the end."""

    def __init__(self, cost: Cost, device: torch.device) -> None:
        self.cost, self.device = cost, device

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cost.wall_seconds += time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            # process-wide peak resident set size (Linux reports KiB)
            self.cost.peak_memory_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_with_cost(ctx: RunContext, body: Callable[[], Any]) -> Any:
    """Run ``body`` timed; on success attach the run's health and warn once if anything was non-finite."""
    try:
        with Timer(ctx.cost, ctx.device):
            result = body()
    finally:
        ctx.close()
    if hasattr(result, "extras"):
        result.extras.setdefault("health", ctx.health.as_dict())
    ctx.health.warn_once(getattr(result, "config", {}).get("method", "run") if hasattr(result, "config") else "run")
    return result
