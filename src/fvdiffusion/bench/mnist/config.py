"""What to run: :class:`MnistBenchConfig` and the named presets (quick, cpu, gpu)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fvdiffusion.bench.common.protocol import TUNING_SEED, check_reported_seeds
from fvdiffusion.bench.mnist.methods import (
    ALL_FAMILIES, ALL_ROWS, BON_KEEP_FRACTION, MAIN_ROWS, MAX_POPULATIONS, NUM_CLASSES, method_rows,
    plan, sampler_config, tuning_families, tuning_points,
)

TUNING_CLASSES = (2, 5, 8)
# settings that change how a run executes or what it keeps, never its numbers (a preset stays that preset)
EXECUTION_FIELDS = ("device", "batch_size", "workers", "store_images")


def _check_ints(name: str, values: tuple[int, ...], minimum: int, maximum: int | None = None,
                allow_empty: bool = False) -> None:
    if not values and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{name}: expected integers {bound}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")


def _check_names(name: str, values: tuple[str, ...], known: tuple[str, ...], allow_empty: bool = True) -> None:
    unknown = [v for v in values if v not in known]
    if unknown or (not values and not allow_empty) or len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct names from {', '.join(known)}, got {values!r}")


@dataclass(frozen=True)
class MnistBenchConfig:
    """One benchmark run.

    A cell (method, class, seed) pools ``populations`` independent runs of N particles, enough
    for ``samples_per_cell`` samples and at least ``min_populations`` (the bootstrap resamples
    populations, so a handful is the least that gives an interval). ``rows`` are method labels
    of :func:`method_rows`; ``families`` are tuned on seed 0 over ``tuning_classes`` with the
    first ``grid_points`` points of each grid and ``tuning_samples`` samples per cell (None:
    ``samples_per_cell``). ``eta`` is the sampler of every method: 1 = DDPM ancestral steps, 0 =
    deterministic DDIM (FVD's defaults differ between the two). ``solver_steps``: FVD rows on
    that many steps of DPM-Solver++(2M) (its SDE variant when ``eta`` > 0), set against the
    K-step fvd row. ``feature_spaces`` None means every space of
    ``metrics.feature_spaces`` whose network is installed. ``workers`` > 1 runs cells in that
    many processes (one torch thread each on a CPU). ``store_images``: keep every sample in
    results.jsonl (so other feature spaces or bootstrap sizes can be scored later); without them
    a row keeps its scores and a preview only.
    """

    classes: tuple[int, ...] = tuple(range(NUM_CLASSES))
    seeds: tuple[int, ...] = (1, 2, 3)
    samples_per_cell: int = 1024
    min_populations: int = 4
    n_particles: int = 64
    num_steps: int = 50
    eta: float = 1.0
    rows: tuple[str, ...] = ALL_ROWS
    svdd_candidates: tuple[int, ...] = (2, 4, 8)
    dts_rollout_factors: tuple[int, ...] = (1, 4)
    scaling_steps: tuple[int, ...] = (25,)
    solver_steps: tuple[int, ...] = ()
    particle_sizes: tuple[int, ...] = ()
    tune: bool = True
    families: tuple[str, ...] = ALL_FAMILIES
    tuning_classes: tuple[int, ...] = TUNING_CLASSES
    grid_points: int = 4
    tuning_samples_per_cell: int | None = 512
    feature_spaces: tuple[str, ...] | None = None
    bootstrap: int = 1000
    device: str = "cpu"
    batch_size: int | None = None
    workers: int = 1
    store_images: bool = True

    def __post_init__(self) -> None:
        _check_ints("classes", self.classes, 0, NUM_CLASSES - 1)
        _check_ints("seeds", self.seeds, 0)
        check_reported_seeds(self.seeds)
        for name in ("samples_per_cell", "n_particles", "num_steps"):
            _check_ints(name, (getattr(self, name),), 2)
        for name in ("min_populations", "grid_points", "workers"):
            _check_ints(name, (getattr(self, name),), 1)
        _check_ints("bootstrap", (self.bootstrap,), 10)
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: expected a number in [0, 1] (1 = DDPM, 0 = DDIM), got {self.eta!r}")
        _check_names("rows", self.rows, ALL_ROWS)
        _check_ints("svdd_candidates", self.svdd_candidates, 1, allow_empty=True)
        _check_ints("dts_rollout_factors", self.dts_rollout_factors, 1, allow_empty=True)
        _check_ints("scaling_steps", self.scaling_steps, 2, allow_empty=True)
        _check_ints("solver_steps", self.solver_steps, 2, allow_empty=True)
        _check_ints("particle_sizes", self.particle_sizes, 2, allow_empty=True)
        if self.num_steps in self.scaling_steps:
            raise ValueError(f"scaling_steps must not repeat num_steps={self.num_steps}: got {self.scaling_steps}")
        if self.tune:
            _check_ints("tuning_classes", self.tuning_classes, 0, NUM_CLASSES - 1)
            _check_names("families", self.families, ALL_FAMILIES, allow_empty=False)
            short = [f.name for f in tuning_families(self.num_steps)
                     if f.name in self.families and len(f.grid) < self.grid_points]
            if short:
                raise ValueError(f"grid_points={self.grid_points}: the grids of {short} have fewer points")
        if self.tuning_samples_per_cell is not None:
            _check_ints("tuning_samples_per_cell", (self.tuning_samples_per_cell,), 2)
        if self.feature_spaces is not None:
            from fvdiffusion.metrics.feature_spaces import FEATURE_SPACES

            _check_names("feature_spaces", self.feature_spaces, tuple(FEATURE_SPACES), allow_empty=False)
        if self.batch_size is not None:
            _check_ints("batch_size", (self.batch_size,), 1)
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        keep = max(1, int(self.n_particles * BON_KEEP_FRACTION))  # best-of-N returns the fewest per population
        needed = max(self.min_populations, math.ceil(max(self.samples_per_cell, self.tuning_samples) / keep))
        if needed > MAX_POPULATIONS:
            raise ValueError(f"samples_per_cell / min_populations need {needed} populations of {self.n_particles}, "
                             f"more than {MAX_POPULATIONS}")
        for row in method_rows(self.n_particles, self.num_steps):  # every option must build a valid sampler config
            if row.spec.label in self.rows:
                sampler_config(row.spec, 1, self)
        for planned in plan(self):  # the solver's transition must be valid with this eta
            if planned.group == "solver":
                sampler_config(planned.spec, 1, self)
        for point in tuning_points(self):
            sampler_config(point.spec, TUNING_SEED, self)

    @property
    def tuning_samples(self) -> int:
        return self.tuning_samples_per_cell or self.samples_per_cell

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MnistBenchConfig":
        """A named preset with ``overrides`` (None values ignored) on top."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
        values = dict(PRESETS[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def quick(cls, **overrides: Any) -> "MnistBenchConfig":
        return cls.preset("quick", **overrides)


# The paper-scale CPU benchmark of issue 19: every class, N = 128, K = 50, one population of 128
# per cell (intervals and win counts come from the paired cells), the SMC baselines that matter and
# FVD with its variants; tuned on seed 0 over classes 2, 5, 8 with the same 8-point budget for the
# fvd, smc and vasr families, judged in the ae and evalnet spaces only (mlp stays held out). One
# solver row: FVD with 20 DPM-Solver++(2M) steps against the 50-step fvd row (issue 20 item 6); the
# existing rows keep their keys, so a results.jsonl written before it resumes and runs only that row.
PAPER_ROWS = ("bon-matched", "smc-fk", "smc-multinomial", "smc-systematic", "smc-ess-systematic", "vasr", "fvd", "fvd-nu0",
              "fvd-multinomial", "fvd-systematic")

PRESETS: dict[str, dict[str, Any]] = {
    # minutes on a CPU: every code path (tuning, every main row, a value-based row, a scaling row)
    "quick": dict(classes=TUNING_CLASSES, seeds=(1,), samples_per_cell=32, min_populations=2, n_particles=16,
                  num_steps=10, rows=("base", *MAIN_ROWS), svdd_candidates=(2,), dts_rollout_factors=(1,),
                  scaling_steps=(5,), tuning_classes=(2,), grid_points=2, tuning_samples_per_cell=32, bootstrap=200),
    # the CPU-reduced benchmark (about 45 minutes on 2 cores, one process per core): 3 classes, 3
    # seeds, 256 samples (4 populations of 64) per cell, K = 25, the main rows and every tuned
    # family with 3 grid points (128 samples per tuning cell); no value-based or scaling rows
    "cpu": dict(classes=TUNING_CLASSES, seeds=(1, 2, 3), samples_per_cell=256, min_populations=4, n_particles=64,
                num_steps=25, rows=MAIN_ROWS, svdd_candidates=(), dts_rollout_factors=(), scaling_steps=(),
                grid_points=3, tuning_samples_per_cell=128, bootstrap=1000, workers=2),
    # the full benchmark of FVD against the SMC baselines: 10 classes, 3 seeds, 1024 samples (16
    # populations of 64) per cell, K = 50, the main rows and every tuned family with 4 grid points
    # (512 samples per tuning cell). Unsteered, ablation, value-based and scaling rows are opt-in
    # (--methods, --svdd-candidates, --dts-rollouts, --scaling-steps): they would double the cost.
    # Several processes share the GPU, because one population of 64 cannot fill it.
    # Rows keep scores, not images: with images the file would be about 100 MB.
    "paper": dict(classes=tuple(range(NUM_CLASSES)), seeds=(1, 2), samples_per_cell=128, min_populations=1,
                  n_particles=128, num_steps=50, rows=PAPER_ROWS, svdd_candidates=(), dts_rollout_factors=(),
                  scaling_steps=(), solver_steps=(20,), families=("fvd", "smc", "vasr"), grid_points=8,
                  tuning_samples_per_cell=128, bootstrap=1000, workers=2),
    # Quality against wall time as N grows (issue 19 item 6): best-of-N, systematic SMC, VASR and
    # FVD at N = 32 … 256 on three classes, 128 samples per cell; add --eta 0 for DDIM.
    "wall": dict(classes=(0, 5, 9), seeds=(1,), samples_per_cell=128, min_populations=1, n_particles=128,
                 num_steps=50, rows=(), svdd_candidates=(), dts_rollout_factors=(), scaling_steps=(),
                 particle_sizes=(32, 64, 128, 256), tune=False, bootstrap=1000, workers=2),
    "gpu": dict(rows=MAIN_ROWS, svdd_candidates=(), dts_rollout_factors=(), scaling_steps=(), device="cuda",
                workers=8, store_images=False),
}


def preset_name(cfg: MnistBenchConfig) -> str | None:
    """The preset ``cfg`` is, up to execution settings (device, micro-batch, workers) and the sampler
    (``eta``, which the reproduce command names on its own), or None."""
    for name in PRESETS:
        execution = {f: getattr(cfg, f) for f in (*EXECUTION_FIELDS, "eta")}
        if cfg == replace(MnistBenchConfig.preset(name), **execution):
            return name
    return None
