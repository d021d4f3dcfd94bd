"""The Reward protocol."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """r(x0) for a batch: takes x0 [B, ...] (and optional conditioning), returns a float Tensor [B].

    Rewards may return NaN or ±inf; the engine treats such a particle as dead (potential −inf).
    """

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor: ...


class CallableReward:
    """Adapt a plain function ``f(x0) -> Tensor[B]`` to the Reward protocol."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x0)


class CountingReward:
    """Forwards to another reward and counts the particles it scored (for cost audits)."""

    def __init__(self, inner: Reward) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        self.calls += x0.shape[0]
        return self.inner(x0, cond)
