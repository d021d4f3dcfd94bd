"""The thin denoising loop shared by the particle methods, with cost counting.

A particle method is the loop plus a *policy*: after the denoiser call of every step the
policy may evaluate rewards, reweight, select and copy particles; the loop then takes the
DDIM(η) step for the whole population. Randomness comes from one generator seeded by the
config, and every noise tensor is drawn for the whole population at once, so micro-batching
the denoiser or the reward cannot change a result.
"""

from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.population import ParticleState, initial_state
from fvdiffusion.result import Cost, Lineage, StepTrace
from fvdiffusion.rewards.base import Reward
from fvdiffusion.samplers.config import CommonConfig
from fvdiffusion.schedule import Prediction, ddim_step, to_x0_eps


class RewardError(RuntimeError):
    """The reward raised or returned something the engine cannot use."""


class NonFiniteRewardWarning(RuntimeWarning):
    """Some rewards of a run were NaN/±inf; those particles got zero weight. Issued once per run."""


class AllParticlesDeadWarning(NonFiniteRewardWarning):
    """At one or more steps every particle had potential −inf; weights were reset to uniform there."""


@dataclass
class RunHealth:
    """What went wrong quietly during a run, summed so it can be reported once at the end."""

    reward_values: int = 0          # rewards evaluated (rows)
    nonfinite_rewards: int = 0      # of those, NaN or ±inf
    all_dead_steps: set[int] = field(default_factory=set)  # steps k where every weight was −inf

    def as_dict(self) -> dict[str, Any]:
        return {"reward_values": self.reward_values, "nonfinite_rewards": self.nonfinite_rewards,
                "all_dead_steps": sorted(self.all_dead_steps, reverse=True)}

    def warn_once(self, method: str) -> None:
        """One summary warning for the whole run (never one per step)."""
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
    def denoise(self, x: Tensor, t: int, alpha_bar: float) -> Prediction:
        """One denoiser evaluation per row of x, micro-batched; returns (x̂0, ε̂)."""
        outputs = []
        for chunk in _chunks(x, self.config.batch_size):
            t_batch = torch.full((chunk.shape[0],), t, dtype=torch.long, device=chunk.device)
            out = self.denoiser(chunk, t_batch, self.cond)
            if out.shape != chunk.shape:
                raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected {tuple(chunk.shape)}")
            outputs.append(out)
            self.cost.denoiser_calls += chunk.shape[0]
        model_output = torch.cat(outputs)
        return to_x0_eps(model_output, x, alpha_bar, self.denoiser.prediction_type)

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
                raise RewardError(f"reward raised {where}: {type(exc).__name__}: {exc}") from exc
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
        pred = ctx.denoise(state.x, t, info.alpha_bar)
        state = replace(state, x0_hat=pred.x0, eps_hat=pred.eps)
        state, trace = policy(ctx, info, state)
        noise = ctx.randn(shape) if cfg.eta > 0 else None
        x_prev = ddim_step(state.x0_hat, state.eps_hat, info.alpha_bar, info.alpha_bar_prev, cfg.eta, noise)
        state = replace(state, x=x_prev)
        ctx.record(trace)
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
