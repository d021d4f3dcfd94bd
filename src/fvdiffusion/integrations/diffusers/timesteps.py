"""The step grid a diffusers scheduler chooses, and whether its own stepping equals the engine's.

``align()`` asks a deep copy of ``pipe.scheduler`` for ``set_timesteps(K)``, so the user's
``timestep_spacing``, ``steps_offset`` and zero-terminal-SNR settings decide where the K steps
fall. The stepping itself is always the engine's DDIM(η): a scheduler's ``step()`` keeps state
for the batch as a whole (a step counter, past model outputs of a multistep solver, sigmas),
which would belong to the wrong particle once selection copies and kills particles.

DDIM and DDPM schedulers are the engine's own step (DDIM(η) with η = 0 and η = 1), so for them
the grid reproduces diffusers exactly, landing points included: ``DDIMScheduler`` steps from t
to t − T // K (whatever the spacing put next) and ends on ``final_alpha_cumprod``;
``DDPMScheduler`` steps to the next timestep and ends on clean data. Every other scheduler is
*replaced*: its timesteps (rounded to training steps, repeats of second-order solvers dropped)
with the engine's landing on the next one, and one :class:`SchedulerReplacedWarning` says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from fvdiffusion.errors import SchedulerReplacedWarning
from fvdiffusion.schedule import StepGrid, VPSchedule

# step(): DDIM(η) landing on t − T // K, the last step on final_alpha_cumprod
DDIM_SCHEDULERS = frozenset({"DDIMScheduler", "DDIMParallelScheduler"})
# step(): the DDPM posterior = DDIM(η = 1), landing on the next timestep, the last on ᾱ = 1
DDPM_SCHEDULERS = frozenset({"DDPMScheduler", "DDPMParallelScheduler"})
# DDPM variances equal to DDIM(η = 1)'s σ² (the posterior variance β̃, possibly in log form)
_POSTERIOR_VARIANCES = frozenset({"fixed_small", "fixed_small_log"})

__all__ = ["SchedulerGrid", "scheduler_grid", "ddim_timesteps", "SchedulerReplacedWarning",
           "DDIM_SCHEDULERS", "DDPM_SCHEDULERS"]


@dataclass(frozen=True)
class SchedulerGrid:
    """The engine's step grid for a scheduler, and why its stepping differs from diffusers' (empty: it does not)."""

    grid: StepGrid
    scheduler: str                  # the scheduler's class name
    timesteps: tuple[float, ...]    # what its set_timesteps(K) chose, as it chose them
    differences: tuple[str, ...]    # reasons pipe(...) would step differently; () = equivalent

    @property
    def replaced(self) -> bool:
        return bool(self.differences)

    def warning(self, eta: float) -> str:
        """The one-line message of :class:`SchedulerReplacedWarning`."""
        return (f"align() replaces {self.scheduler}'s stepping with the engine's DDIM(eta={eta:g}) on the "
                f"{len(self.grid)} timesteps {self.scheduler}.set_timesteps chose ({self.grid[0].t} ... "
                f"{self.grid[-1].t}): " + "; ".join(self.differences)
                + ". Images differ from pipe(...) with this scheduler; a DDIMScheduler (eta=0) or DDPMScheduler "
                  "(eta=1) without clip_sample or thresholding steps exactly as diffusers does.")


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> list[int]:
    """The timesteps ``DDIMScheduler.set_timesteps`` chooses (diffusers 0.2x–0.4x), without diffusers."""
    T, K = num_train_timesteps, num_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, K).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, K) * (T // K)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; expected 'linspace', 'leading' or 'trailing'")
    return [int(t) for t in ts]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _chosen_timesteps(scheduler: Any, num_steps: int) -> list[float]:
    name = type(scheduler).__name__
    if not hasattr(scheduler, "set_timesteps"):
        raise TypeError(f"{name} has no set_timesteps(); align() needs a diffusers scheduler")
    probe = copy.deepcopy(scheduler)  # the user's scheduler keeps its own state
    try:
        probe.set_timesteps(num_steps)
    except Exception as exc:
        raise ValueError(f"{name}.set_timesteps({num_steps}) failed: {_one_line(exc)}") from exc
    return [float(t) for t in np.asarray(probe.timesteps.detach().cpu() if hasattr(probe.timesteps, "detach")
                                         else probe.timesteps, dtype=np.float64).reshape(-1)]


def _usable(raw: list[float], num_steps: int, T: int) -> list[int] | None:
    """K distinct decreasing training steps from a scheduler's timesteps, or None.

    Rounded to whole training steps; repeats in a row (Heun, KDPM2-ancestral and PNDM visit a
    timestep twice) dropped.
    """
    steps: list[int] = []
    for t in raw:
        r = int(round(t))
        if not steps or r != steps[-1]:
            steps.append(r)
    ok = len(steps) == num_steps and all(0 <= t < T for t in steps) and all(a > b for a, b in zip(steps, steps[1:]))
    return steps if ok else None


def scheduler_grid(scheduler: Any, num_steps: int, schedule: VPSchedule) -> SchedulerGrid:
    """The grid ``scheduler.set_timesteps(num_steps)`` decides, as the engine's :class:`StepGrid`.

    ``schedule`` is the engine's schedule of the same scheduler
    (:func:`~fvdiffusion.integrations.diffusers.denoisers.schedule_from_scheduler`).
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {num_steps!r}")
    raw = _chosen_timesteps(scheduler, num_steps)
    differences: list[str] = []

    def option(key: str, default: Any) -> Any:
        return getattr(config, key, default) if config is not None else default

    if name in DDIM_SCHEDULERS or name in DDPM_SCHEDULERS:
        timesteps = [int(t) for t in raw]
        if name in DDIM_SCHEDULERS:
            stride = T // num_steps
            end = -1 if option("set_alpha_to_one", True) else 0  # final_alpha_cumprod: 1 or ᾱ_0
            landings = [t - stride if t - stride >= 0 else end for t in timesteps]
        else:
            landings = timesteps[1:] + [-1]
            variance = option("variance_type", "fixed_small")
            if variance not in _POSTERIOR_VARIANCES:
                differences.append(f"its variance_type={variance!r} is not the posterior variance of DDIM(eta=1)")
        if option("thresholding", False):
            differences.append("dynamic thresholding of x0 (thresholding=True) is not applied")
        elif option("clip_sample", False):
            differences.append("x0 clipping (clip_sample=True) is not applied")
        if len(timesteps) != num_steps:
            raise ValueError(f"{name}.set_timesteps({num_steps}) chose {len(timesteps)} timesteps, expected {num_steps}")
        grid = StepGrid.from_landings(schedule, timesteps, landings)
        return SchedulerGrid(grid, name, tuple(raw), tuple(differences))

    differences.append(
        f"{name} is not DDIM or DDPM, and its step() keeps state for the batch as a whole (step index, past "
        "model outputs of multistep solvers, sigmas) that would belong to the wrong particle after selection"
    )
    timesteps = _usable(raw, num_steps, T)
    if timesteps is None:
        spacing, offset = option("timestep_spacing", "leading"), option("steps_offset", 0)
        timesteps = ddim_timesteps(T, num_steps, spacing, offset)
        differences.append(f"its {len(raw)} timesteps are not {num_steps} distinct training steps, so the grid is "
                           f"DDIM's with timestep_spacing={spacing!r}, steps_offset={offset}")
    elif any(abs(t - round(t)) > 1e-6 for t in raw):
        differences.append("its timesteps are rounded to whole training steps")
    grid = StepGrid.from_timesteps(schedule, timesteps)
    return SchedulerGrid(grid, name, tuple(raw), tuple(differences))
