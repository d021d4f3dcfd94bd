"""The run's health (faults summed for one warning) and the trace rows every step writes."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.errors import AllParticlesDeadWarning, NonFiniteDenoiserWarning, NonFiniteRewardWarning
from fvdiffusion.population import ParticleState
from fvdiffusion.result import StepTrace
from fvdiffusion.schedule import StepInfo


@dataclass(frozen=True)
class StepEvent:
    """What an observe-only callback sees after each step: the step, the population, its trace row.

    The tensors are the engine's own and may be overwritten in place later: clone what you keep.
    """

    info: StepInfo
    state: ParticleState
    trace: StepTrace


@dataclass
class RunHealth:
    """What went wrong quietly during a run, summed so it can be reported once at the end.

    Counts may be device tensors until :meth:`settle` reads them after the loop.
    """

    reward_values: int = 0          # rewards evaluated (rows)
    nonfinite_rewards: Any = 0      # of those, NaN or ±inf
    all_dead_steps: set[int] = field(default_factory=set)  # steps k where every weight was −inf
    denoiser_values: int = 0        # denoiser outputs (rows)
    nonfinite_denoiser: int = 0     # of those, with a NaN or ±inf entry (killed under nonfinite_denoiser="kill")
    _dead_flags: list[tuple[int, Tensor]] = field(default_factory=list)

    def settle(self) -> None:
        """Read the deferred counters on the host (after the loop)."""
        if isinstance(self.nonfinite_rewards, Tensor):
            self.nonfinite_rewards = int(self.nonfinite_rewards)
        if self._dead_flags:
            flags = torch.stack([flag for _, flag in self._dead_flags]).cpu().tolist()
            self.all_dead_steps.update(k for (k, _), dead in zip(self._dead_flags, flags) if dead)
            self._dead_flags = []

    def as_dict(self) -> dict[str, Any]:
        self.settle()
        return {"reward_values": self.reward_values, "nonfinite_rewards": self.nonfinite_rewards,
                "all_dead_steps": sorted(self.all_dead_steps, reverse=True),
                "denoiser_values": self.denoiser_values, "nonfinite_denoiser": self.nonfinite_denoiser}

    def warn_once(self, method: str) -> None:
        """One summary warning per kind of fault for the whole run (never one per step)."""
        self.settle()
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


def reward_stats(reward: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of the finite rewards as 0-dim tensors (NaN when none is finite)."""
    finite = torch.isfinite(reward)
    mean = torch.where(finite, reward, torch.zeros_like(reward)).sum() / finite.sum()
    best = torch.where(finite, reward, torch.full_like(reward, -math.inf)).amax()
    return mean, torch.where(finite.any(), best, torch.full_like(best, math.nan))



def distinct_count(index: Tensor) -> Tensor:
    """How many distinct values a long tensor of indices in [0, N) holds (0-dim, no sort)."""
    seen = torch.zeros(index.numel(), dtype=torch.bool, device=index.device)
    return seen.index_fill_(0, index, True).sum()


def plain_trace(info: StepInfo, state: ParticleState, lam: float, **overrides: Any) -> StepTrace:
    """A trace row with the population statistics filled in; callers override what they changed.

    Values may be 0-dim device tensors; :func:`settle_trace` turns them into numbers.
    """
    mean, best = reward_stats(state.reward)
    values = dict(
        step=info.k, t=info.t, selected=False, ess=1.0, dead_fraction=0.0, lam=lam, kappa=1.0,
        distinct_roots=distinct_count(state.root), reward_mean=mean, reward_max=best, nonfinite_rewards=0,
    )
    values.update(overrides)
    return StepTrace(**values)


_INT_FIELDS = {"step", "t", "distinct_roots", "nonfinite_rewards"}


def settle_trace(rows: list[StepTrace]) -> list[StepTrace]:
    """The rows with every tensor value read on the host in one transfer (ints stay ints)."""
    slots = [(i, f.name) for i, row in enumerate(rows) for f in fields(row) if isinstance(getattr(row, f.name), Tensor)]
    if not slots:
        return rows
    tensors = [getattr(rows[i], name).detach().reshape(()) for i, name in slots]
    by_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(position)
    values: list[float] = [0.0] * len(tensors)
    for positions in by_device.values():  # one transfer per device
        read = torch.stack([tensors[p].to(torch.float64) for p in positions]).cpu().tolist()
        for p, value in zip(positions, read):
            values[p] = value
    settled = [dict() for _ in rows]
    for (i, name), value in zip(slots, values):
        settled[i][name] = int(value) if name in _INT_FIELDS else (bool(value) if name == "selected" else value)
    return [replace(row, **changes) if changes else row for row, changes in zip(rows, settled)]
