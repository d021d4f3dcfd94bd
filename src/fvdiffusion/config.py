"""Sampler configs: dataclasses that validate on construction and name the bad field."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from fvdiffusion.errors import ConfigError


def _fail(field_name: str, value: Any, expected: str) -> None:
    raise ConfigError(f"invalid {field_name}={value!r}: expected {expected}")


SEED_MAX = 2**63 - 1


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def check_float(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(name, value, "a number")
    if math.isinf(value) and not allow_inf:
        _fail(name, value, "a finite number")
    if not lo <= value <= hi:
        _fail(name, value, f"a number in [{lo}, {hi}]")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def check_bool_fields(config: Any) -> None:
    """Every field annotated ``bool`` (or ``bool | None``, then None too) must hold a real bool.

    A string such as "False" is truthy; accepting it would silently flip the option.
    """
    for f in fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        value = getattr(config, f.name)
        if annotation == "bool" or (annotation in ("bool | None", "Optional[bool]") and value is not None):
            check_bool(f.name, value)


def did_you_mean(name: Any, candidates: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest candidate to a misspelt ``name``, or ""."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, f"one of {', '.join(choices)}{did_you_mean(value, choices)}")


NONFINITE_DENOISER = ("raise", "kill")
# How particles move between grid points (fvdiffusion.transitions): the names a config may give.
TRANSITIONS = ("ddim", "ddpm", "euler", "dpmpp_2m", "unipc")
# those that keep a per-particle history of past outputs (a search tree keeps none per node)
MULTISTEP_TRANSITIONS = ("dpmpp_2m", "unipc")


# The transition fields at their defaults are left out of ``as_dict`` (stored results stay keyed).
TRANSITION_DEFAULTS = {"transition": "ddim", "clip_x0": None, "dynamic_threshold": None, "dynamic_threshold_max": 1.0}


@dataclass(frozen=True)
class CommonConfig:
    """Fields every method shares.

    n_particles: population size N.  num_steps: denoising steps K.  eta: the transition's noise
    η (for "ddim": 1 = DDPM ancestral, 0 = deterministic DDIM).  transition: how particles move
    between grid points — "ddim", "ddpm", "euler" (η > 0: ancestral), "dpmpp_2m" (DPM-Solver++(2M);
    η > 0: its SDE variant); see ``fvdiffusion.transitions``.  clip_x0 / dynamic_threshold /
    dynamic_threshold_max: x̂0 processing before each step, as a diffusers scheduler's
    ``clip_sample_range`` / ``dynamic_thresholding_ratio`` / ``sample_max_value`` (None = off).  lam: reward scale λ ≥ 0 (π* ∝ p·exp(λ r); may be
    inf for argmax variants that accept it).  seed: the one seed of the run.  batch_size:
    micro-batch for denoiser and reward calls (None = sized from a memory budget, see
    ``fvdiffusion.loop.auto_batch_rows``; results do not depend on it).  nonfinite_denoiser: what a NaN/±inf denoiser output does — "raise"
    (DenoiserError naming the step and the count) or "kill" (those particles die and are
    reborn as copies of survivors, counted and warned once; an error only if none is left).
    noise_chunk: None draws the run's noise from one generator in call order; C draws it per
    chunk of C particle slots from generators keyed by (seed, draw, chunk), so that the same
    run split over processes gives the same numbers (set automatically in a process group;
    see ``fvdiffusion.noise``). Population methods only.
    """

    n_particles: int = 64
    num_steps: int = 50
    eta: float = 1.0
    lam: float = 1.0
    seed: int = 0
    batch_size: int | None = None
    nonfinite_denoiser: str = "raise"
    noise_chunk: int | None = None
    transition: str = "ddim"
    clip_x0: float | None = None
    dynamic_threshold: float | None = None
    dynamic_threshold_max: float = 1.0

    allow_infinite_lambda = False  # class-level: argmax methods (svdd, dts*) switch it on

    def __post_init__(self) -> None:
        check_int("n_particles", self.n_particles, 1)
        check_int("num_steps", self.num_steps, 1)
        check_float("eta", self.eta, 0.0, 1.0)
        check_float("lam", self.lam, 0.0, math.inf, allow_inf=self.allow_infinite_lambda)
        check_int("seed", self.seed, 0)
        if self.seed > SEED_MAX:
            _fail("seed", self.seed, f"an integer <= {SEED_MAX} (torch generators take 64-bit seeds)")
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, 1)
        check_choice("nonfinite_denoiser", self.nonfinite_denoiser, NONFINITE_DENOISER)
        if self.noise_chunk is not None:
            check_int("noise_chunk", self.noise_chunk, 1)
        check_choice("transition", self.transition, TRANSITIONS)
        if self.transition == "ddpm" and self.eta != 1.0:
            _fail("eta", self.eta, "1 for transition='ddpm' (its noise is the DDPM posterior's; use "
                  "transition='ddim' for another eta)")
        if self.transition == "unipc" and self.eta != 0.0:
            _fail("eta", self.eta, "0 for transition='unipc' (an ODE solver, with no stochastic variant)")
        if self.clip_x0 is not None:
            check_float("clip_x0", self.clip_x0, 0.0, math.inf)
        if self.dynamic_threshold is not None:
            check_float("dynamic_threshold", self.dynamic_threshold, 0.0, 1.0)
        check_float("dynamic_threshold_max", self.dynamic_threshold_max, 1.0, math.inf)
        check_bool_fields(self)

    def as_dict(self) -> dict[str, Any]:
        """Every field, except a fault policy or the one-stream noise at their defaults: stored
        results keyed by this dict must not all rerun because such a field was added."""
        values = asdict(self)
        if values["nonfinite_denoiser"] == "raise":
            del values["nonfinite_denoiser"]
        if values["noise_chunk"] is None:
            del values["noise_chunk"]
        for name, default in TRANSITION_DEFAULTS.items():
            if values[name] == default:
                del values[name]
        return values

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass(frozen=True)
class SelectionScheduleMixin:
    """When selection may happen: every ``selection_interval``-th step inside a window.

    The window is given as fractions of the trajectory, 0 = the first (noisiest) step and
    1 = the last: ``selection_start=0.2`` skips the first 20% of steps, where x̂0 is a blur.
    """

    selection_interval: int = 1
    selection_start: float = 0.0
    selection_end: float = 1.0

    def _check_schedule(self) -> None:
        check_int("selection_interval", self.selection_interval, 1)
        check_float("selection_start", self.selection_start, 0.0, 1.0)
        check_float("selection_end", self.selection_end, 0.0, 1.0)
        if self.selection_start > self.selection_end:
            _fail("selection_start", self.selection_start, f"<= selection_end ({self.selection_end})")

    def is_selection_step(self, step_index: int, num_steps: int) -> bool:
        """step_index counts 0 … K−1 from the first step."""
        pos = step_index / max(num_steps - 1, 1)
        if not self.selection_start - 1e-9 <= pos <= self.selection_end + 1e-9:
            return False
        first = math.ceil(self.selection_start * max(num_steps - 1, 1) - 1e-9)
        return (step_index - first) % self.selection_interval == 0


def in_window(cfg: SelectionScheduleMixin, step_index: int, num_steps: int) -> bool:
    pos = step_index / max(num_steps - 1, 1)
    return cfg.selection_start - 1e-9 <= pos <= cfg.selection_end + 1e-9
