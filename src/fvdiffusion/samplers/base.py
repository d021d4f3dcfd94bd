"""base and bon: independent samples of the base sampler (best-of-N ranks them by reward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fvdiffusion.config import CommonConfig, ConfigError, check_int
from fvdiffusion.loop import FinalWeighting, RunContext, StepResult, plain_trace
from fvdiffusion.population import ParticleState, gather
from fvdiffusion.schedule import StepInfo


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


class BaseKernel:
    """No interaction: every step leaves the population as it is."""

    requires_final_reward = False

    def __init__(self, config: CommonConfig) -> None:
        self.config = config

    def init(self, ctx: RunContext, state: ParticleState) -> ParticleState:
        return state

    def step(self, ctx: RunContext, info: StepInfo, state: ParticleState) -> StepResult:
        return StepResult(state, plain_trace(info, state, self.config.lam))

    def finish(self, ctx: RunContext, state: ParticleState) -> FinalWeighting:
        return FinalWeighting(state)


class BestOfNKernel(BaseKernel):
    """Base samples, ranked by final reward (NaN last); a permutation, not a selection."""

    requires_final_reward = True

    def finish(self, ctx: RunContext, state: ParticleState) -> FinalWeighting:
        order = torch.argsort(torch.nan_to_num(state.reward, nan=-float("inf")), descending=True, stable=True)
        state = gather(state, order)
        order = order.cpu()
        return FinalWeighting(state, extras={"ranking": order, "top_k": self.config.top_k,
                                             "top_k_samples": state.x[: self.config.top_k]}, reordered=order)
