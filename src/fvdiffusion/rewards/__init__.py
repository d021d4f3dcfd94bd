"""Rewards: (x0 batch, cond) -> Tensor[B]."""

from fvdiffusion.rewards.base import CallableReward, CountingReward, Reward

__all__ = ["Reward", "CallableReward", "CountingReward"]
