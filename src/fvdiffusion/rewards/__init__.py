"""Rewards: (x0 batch, cond) -> Tensor[B]."""

from fvdiffusion.rewards.base import Reward, CallableReward

__all__ = ["Reward", "CallableReward"]
