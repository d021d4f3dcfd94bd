"""What the ground-truth benchmark samples: a denoiser, a smooth reward, and the statistics of x0.

The reward must be one of the statistics (``reward_statistic``): the importance weights of the
reference are exp(λ r(x0)) computed from the stored statistic, so they weigh exactly what the
methods' reward saw at the end.

- :func:`mnist_testbed` — the shipped MNIST DDPM; r(x) = mean ink, the mean over pixels of
  (x + 1) / 2 (linear in x, so smooth, and evaluated unclamped on x̂0 during sampling).
- :func:`toy_testbed` — an exact Gaussian-mixture problem with its linear reward a·x (tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.bench.truth.statistics import MnistStatistics, VectorStatistics

Statistics = Callable[[Tensor], Tensor]  # x0 [B, ...] -> [B, S] float64 on the CPU, with .names


class MeanInk:
    """r(x) = mean over pixels of (x + 1) / 2 for images in [-1, 1] (unclamped: linear in x)."""

    name = "mean_ink"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return ((x0 + 1) / 2).flatten(1).mean(1)


@dataclass(frozen=True, eq=False)
class TruthTestbed:
    """A named problem: ``denoiser`` and ``reward`` drive the samplers, ``statistics`` judge them."""

    name: str
    denoiser: Any
    reward: Any
    statistics: Any
    reward_statistic: str

    def __post_init__(self) -> None:
        if self.reward_statistic not in self.statistics.names:
            raise ValueError(f"reward_statistic {self.reward_statistic!r} is not one of the statistics "
                             f"{', '.join(self.statistics.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.statistics.names)

    @property
    def reward_index(self) -> int:
        return self.names.index(self.reward_statistic)


def mnist_testbed(device: str | torch.device = "cpu") -> TruthTestbed:
    """The shipped MNIST DDPM with the mean-ink reward."""
    from fvdiffusion.zoo.loaders import load_ddpm

    return TruthTestbed("mnist-ddpm/mean_ink", load_ddpm(device=device), MeanInk(), MnistStatistics(), "mean_ink")


def toy_testbed(problem: str = "gmm2d-linear") -> TruthTestbed:
    """An exact mixture problem with a linear reward a·x (``<mixture>-linear``)."""
    from fvdiffusion.schedule import VPSchedule
    from fvdiffusion.testbeds import toy_problem

    toy = toy_problem(problem)
    a = getattr(toy.reward, "a", None)
    if a is None:
        raise ValueError(f"toy problem {problem!r} has no linear reward; use a '<mixture>-linear' problem")
    return TruthTestbed(problem, toy.denoiser(VPSchedule.linear(1000)), toy.reward, VectorStatistics(a), "reward")
