"""The step grid a diffusers scheduler chooses, and the engine transition that steps as it does.

``align()`` asks a deep copy of ``pipe.scheduler`` for ``set_timesteps(K)``, so the user's
``timestep_spacing``, ``steps_offset`` and zero-terminal-SNR settings decide where the K steps
fall. The stepping is the engine's transition (:mod:`fvdiffusion.transitions`), never the
scheduler's ``step()``: that keeps state for the batch as a whole (a step counter, past model
outputs of a multistep solver), which would belong to the wrong particle once selection copies
and kills particles. The engine keeps a multistep solver's history per particle instead.

Schedulers stepped natively (their x̂0 clipping / dynamic thresholding applied as they ask):

* ``DDIMScheduler`` / ``DDPMScheduler``: DDIM(η) (η = 0 and η = 1), landing points included:
  DDIM steps from t to t − T // K (whatever the spacing put next) and ends on ``final_alpha_cumprod``;
  DDPM steps to the next timestep and ends on clean data.
* ``DPMSolverMultistepScheduler`` (``dpmsolver++`` / ``sde-dpmsolver++``, order 2, midpoint, σ from
  the training schedule, final σ = 0): the ``dpmpp_2m`` transition with η = 0 / 1.
* ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` on whole training steps
  ("leading" or "trailing" spacing): the ``euler`` transition with η = 0 / 1.
* ``UniPCMultistepScheduler`` at its solver defaults (``bh2``, order 2, data prediction, corrector
  on, ``lower_order_final``): the ``unipc`` transition.

Every other scheduler, or one of these with an option the engine does not reproduce, is *replaced*:
its timesteps (rounded to training steps, repeats of second-order solvers dropped) stepped by
DDIM(η), and one :class:`SchedulerReplacedWarning` names the scheduler and the reasons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import math

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
    # the engine options that step as the scheduler does (transition, eta, x̂0 processing); a
    # user's own option of the same name wins
    engine_options: tuple[tuple[str, Any], ...] = ()
    latent_scale: float = 1.0       # the pipeline's x_T is latents · latent_scale in the engine's (VP) terms

    @property
    def replaced(self) -> bool:
        return bool(self.differences)

    def warning(self, eta: float) -> str:
        """The one-line message of :class:`SchedulerReplacedWarning`."""
        return (f"align() replaces {self.scheduler}'s stepping with the engine's DDIM(eta={eta:g}) on the "
                f"{len(self.grid)} timesteps {self.scheduler}.set_timesteps chose ({self.grid[0].t} ... "
                f"{self.grid[-1].t}): " + "; ".join(self.differences)
                + ". Images differ from pipe(...) with this scheduler; DDIMScheduler (eta=0), DDPMScheduler (eta=1), "
                  "DPMSolverMultistepScheduler (dpmsolver++, order 2), UniPCMultistepScheduler (bh2, order 2) and "
                  "Euler(Ancestral)DiscreteScheduler on whole training steps step exactly as diffusers does.")


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


# multistep and sigma-space schedulers the engine's transitions reproduce (under the conditions of _native_gaps)
NATIVE_SCHEDULERS = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                               "EulerAncestralDiscreteScheduler"})
# the schedulers that work on x itself (the others on x/√ᾱ), with diffusers' x̂0 processing
_DATA_SPACE = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"})
_SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                   "use_flow_sigmas")


def _x0_processing(option: Any) -> dict[str, Any]:
    """The engine options for a scheduler's x̂0 thresholding or clipping (diffusers applies one of them)."""
    if option("thresholding", False):
        return {"dynamic_threshold": float(option("dynamic_thresholding_ratio", 0.995)),
                "dynamic_threshold_max": float(option("sample_max_value", 1.0))}
    if option("clip_sample", False):
        return {"clip_x0": float(option("clip_sample_range", 1.0))}
    return {}


def _native_gaps(name: str, option: Any, raw: list[float], num_steps: int, T: int) -> list[str]:
    """Why a scheduler of NATIVE_SCHEDULERS cannot be stepped natively ([] = it can)."""
    if name not in NATIVE_SCHEDULERS:
        return []
    gaps = [f"{key}=True" for key in _SIGMA_SPACINGS if option(key, False)]
    if option("final_sigmas_type", "zero") != "zero":
        gaps.append(f"final_sigmas_type={option('final_sigmas_type', None)!r}")
    if name == "DPMSolverMultistepScheduler":
        if option("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "sde-dpmsolver++"):
            gaps.append(f"algorithm_type={option('algorithm_type', None)!r}")
        if option("solver_order", 2) != 2:
            gaps.append(f"solver_order={option('solver_order', None)!r}")
        if option("solver_type", "midpoint") != "midpoint":
            gaps.append(f"solver_type={option('solver_type', None)!r}")
        if option("variance_type", None) is not None:
            gaps.append(f"variance_type={option('variance_type', None)!r}")
        if option("lambda_min_clipped", -math.inf) != -math.inf:
            gaps.append("lambda_min_clipped")
    elif name == "UniPCMultistepScheduler":
        for key, default in (("solver_order", 2), ("solver_type", "bh2"), ("predict_x0", True),
                             ("lower_order_final", True)):
            if option(key, default) != default:
                gaps.append(f"{key}={option(key, None)!r}")
        if list(option("disable_corrector", []) or []):
            gaps.append(f"disable_corrector={list(option('disable_corrector', []))!r}")
        if option("use_dynamic_shifting", False):
            gaps.append("use_dynamic_shifting=True")
        if option("solver_p", None) is not None:
            gaps.append("solver_p (another scheduler as predictor)")
    else:
        if option("interpolation_type", "linear") != "linear" or option("timestep_type", "discrete") != "discrete":
            gaps.append("interpolation_type / timestep_type other than linear / discrete")
    if any(abs(t - round(t)) > 1e-6 for t in raw):
        spacing = option("timestep_spacing", "linspace")
        gaps.append(f"its timesteps fall between training steps (timestep_spacing={spacing!r}; 'leading' or "
                    f"'trailing' are whole steps)")
    elif _usable(raw, num_steps, T) is None:
        gaps.append(f"its timesteps are not {num_steps} distinct training steps")
    return [f"{name} with " + "; ".join(gaps) + " is not one of the engine's transitions"] if gaps else []


def _native(name: str, option: Any, raw: list[float], num_steps: int, schedule: VPSchedule) -> SchedulerGrid | None:
    """The grid and transition of a natively stepped scheduler, or None if an option rules it out."""
    T = schedule.num_train_timesteps
    if _native_gaps(name, option, raw, num_steps, T):
        return None
    timesteps = _usable(raw, num_steps, T)
    grid = StepGrid.from_timesteps(schedule, timesteps)
    options: dict[str, Any] = _x0_processing(option) if name in _DATA_SPACE else {}
    scale = 1.0
    if name == "DPMSolverMultistepScheduler":
        options.update(transition="dpmpp_2m",
                       eta=1.0 if option("algorithm_type", "dpmsolver++") == "sde-dpmsolver++" else 0.0)
    elif name == "UniPCMultistepScheduler":
        options.update(transition="unipc", eta=0.0)
    else:
        options.update(transition="euler", eta=1.0 if name == "EulerAncestralDiscreteScheduler" else 0.0)
        # the pipeline starts from latents · init_noise_sigma in x/√ᾱ terms: x_T = that · √ᾱ_T
        sigma_max = math.sqrt((1 - grid[0].alpha_bar) / grid[0].alpha_bar)
        spacing = option("timestep_spacing", "linspace")
        init_sigma = sigma_max if spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
        scale = init_sigma * math.sqrt(grid[0].alpha_bar)
    return SchedulerGrid(grid, name, tuple(raw), (), tuple(options.items()), scale)


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
        options = _x0_processing(option)
        if options and name in DDPM_SCHEDULERS:  # the posterior mean reads x_t and the clipped x̂0, not ε̂
            options["transition"] = "ddpm"
        if len(timesteps) != num_steps:
            raise ValueError(f"{name}.set_timesteps({num_steps}) chose {len(timesteps)} timesteps, expected {num_steps}")
        grid = StepGrid.from_landings(schedule, timesteps, landings)
        return SchedulerGrid(grid, name, tuple(raw), tuple(differences), tuple(options.items()))

    if name in NATIVE_SCHEDULERS:
        native = _native(name, option, raw, num_steps, schedule)
        if native is not None:
            return native

    differences.extend(_native_gaps(name, option, raw, num_steps, T))
    differences.append(
        f"{name} is not stepped natively, and its step() keeps state for the batch as a whole (step index, past "
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
