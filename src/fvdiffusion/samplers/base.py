"""base and bon: independent samples of the base sampler (best-of-N ranks them by reward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fvdiffusion.loop import RunContext, StepInfo, plain_trace, run_particle_loop, run_with_cost
from fvdiffusion.population import ParticleState, gather
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.common import make_result
from fvdiffusion.samplers.config import CommonConfig, ConfigError, check_int


@dataclass(frozen=True)
class BaseConfig(CommonConfig):
    """N independent samples; the reward (if given) is only evaluated on the final samples."""


@dataclass(frozen=True)
class BestOfNConfig(CommonConfig):
    """N independent samples ranked by final reward, best first; ``top_k`` are marked as the picks."""

    top_k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("top_k", self.top_k, 1)
        if self.top_k > self.n_particles:
            raise ConfigError(f"invalid top_k={self.top_k}: expected <= n_particles ({self.n_particles})")


def _no_selection(ctx: RunContext, info: StepInfo, state: ParticleState):
    return state, plain_trace(info, state, ctx.config.lam)


def sample_base(denoiser, reward, config: BaseConfig, cond=None, progress: bool = False) -> SampleResult:
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc="base")

    def body() -> SampleResult:
        state = run_particle_loop(ctx, _no_selection)
        if reward is not None:
            rewards = ctx.evaluate_reward(state.x, None)
        else:
            rewards = torch.full((config.n_particles,), float("nan"), dtype=torch.float64)
        return make_result(ctx, "base", state, rewards, torch.zeros(config.n_particles, dtype=torch.float64))

    return run_with_cost(ctx, body)


def sample_bon(denoiser, reward, config: BestOfNConfig, cond=None, progress: bool = False) -> SampleResult:
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc="bon")

    def body() -> SampleResult:
        state = run_particle_loop(ctx, _no_selection)
        rewards = ctx.evaluate_reward(state.x, None)
        # NaN rewards rank last
        order = torch.argsort(torch.nan_to_num(rewards, nan=-float("inf")), descending=True, stable=True)
        state = gather(state, order)
        extras = {"ranking": order, "top_k": config.top_k, "top_k_samples": state.x[: config.top_k]}
        return make_result(ctx, "bon", state, rewards[order], torch.zeros(config.n_particles, dtype=torch.float64), extras)

    return run_with_cost(ctx, body)
