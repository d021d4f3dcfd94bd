"""What the toy benchmark runs: its method rows, value-based budget sweeps, tuning grids, problems
and :class:`ToyBenchConfig`; :func:`resolved` is a cell's resume key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fvdiffusion as fv
from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.common.protocol import check_reported_seeds
from fvdiffusion.testbeds import toy_problem

DEFAULT_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("base", "base", {}, "no reward"),
    MethodSpec("bon", "bon", {}, "best-of-N, all N returned"),
    MethodSpec("smc-multinomial", "smc", {}, "FK steering default: diff potential, resample every step"),
    MethodSpec("smc-systematic", "smc", {"scheme": "systematic"}),
    MethodSpec("smc-ess0.5", "smc", {"ess_threshold": 0.5}, "resample when ESS < N/2"),
    MethodSpec("smc-every5", "smc", {"selection_interval": 5}),
    MethodSpec("vasr", "vasr", {}),
    MethodSpec("fvd", "fvd", {}, "defaults: diff, excess parents, every step, nu=0.5 scaled by copies"),
    MethodSpec("fvd-nu0", "fvd", {"rebirth_noise": 0.0}, "ablation: plain clones"),
    MethodSpec("fvd-nu1", "fvd", {"rebirth_noise": 1.0}, "ablation: full rebirth noise, not scaled"),
    MethodSpec("fvd-weighted", "fvd", {"parent_rule": "weighted"}, "ablation: killing rule"),
    MethodSpec("fvd-level", "fvd", {"potential": "level"}, "ablation: level potential"),
    MethodSpec("fvd-ctrl0.2", "fvd", {"target_dead_fraction": 0.2}, "absorption controller, alpha*=0.2"),
    MethodSpec("ddim:smc-multinomial", "smc", {"eta": 0.0}, "deterministic DDIM steps"),
    MethodSpec("ddim:fvd", "fvd", {"eta": 0.0}, "default under DDIM: nu=1 scaled by copies"),
    MethodSpec("ddim:fvd-nu0", "fvd", {"eta": 0.0, "rebirth_noise": 0.0}, "ablation: plain clones"),
    MethodSpec("ddim:fvd-nu1", "fvd", {"eta": 0.0, "rebirth_noise": 1.0}, "ablation: full rebirth noise, not scaled"),
)

# Value-based methods are swept over their budget so the table can say what they need to match FVD.
VALUE_BASED_SWEEPS: dict[str, tuple[MethodSpec, ...]] = {
    "svdd": tuple(MethodSpec(f"svdd-M{m}", "svdd", {"n_candidates": m}, f"{m} candidates per step")
                  for m in (2, 4, 8, 16)),
    "dts": tuple(MethodSpec(f"dts-R{r}", "dts", {"n_rollouts": r, "node_budget": 2_000_000}, f"{r} rollouts")
                 for r in (256, 1024, 4096, 16384)),
}

TUNING_GRIDS: dict[str, list[dict[str, Any]]] = {
    "fvd": [
        {"rebirth_noise": nu, "selection_interval": every, "selection_start": start}
        for nu in (0.0, 0.5, 1.0) for every in (1, 5) for start in (0.0, 0.2)
    ],
    "smc": [
        {"scheme": scheme, **trigger}
        for scheme in ("multinomial", "systematic")
        for trigger in ({}, {"selection_interval": 5}, {"ess_threshold": 0.5})
    ],
}

DEFAULT_PROBLEMS = ("gmm2d-component", "gmm8d-component", "gmm2d-linear", "gmm8d-linear")

# A multistep solver at fewer steps (issue 20 item 6): base and FVD with 20 steps of DPM-Solver++(2M)
# (η = 0, the ODE solver) against the same methods on the K-step deterministic DDIM grid, with DDIM on
# 20 steps as the control (what fewer steps cost without the solver). A table of its own, so the
# per-problem tables keep their rows; ddim:fvd is the same cell as the main table's.
SOLVER_STEPS = 20
_DDIM_FVD = next(s for s in DEFAULT_METHODS if s.label == "ddim:fvd")
SOLVER_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("ddim:base", "base", {"eta": 0.0}, "deterministic DDIM, K steps"),
    MethodSpec(f"ddim:base-K{SOLVER_STEPS}", "base", {"eta": 0.0, "num_steps": SOLVER_STEPS},
               f"deterministic DDIM, {SOLVER_STEPS} steps"),
    MethodSpec(f"dpmpp2m:base-K{SOLVER_STEPS}", "base", {"eta": 0.0, "num_steps": SOLVER_STEPS,
                                                         "transition": "dpmpp_2m"},
               f"DPM-Solver++(2M), {SOLVER_STEPS} steps"),
    _DDIM_FVD,
    MethodSpec(f"ddim:fvd-K{SOLVER_STEPS}", "fvd", {"eta": 0.0, "num_steps": SOLVER_STEPS},
               f"deterministic DDIM, {SOLVER_STEPS} steps"),
    MethodSpec(f"dpmpp2m:fvd-K{SOLVER_STEPS}", "fvd", {"eta": 0.0, "num_steps": SOLVER_STEPS,
                                                       "transition": "dpmpp_2m"},
               f"DPM-Solver++(2M), {SOLVER_STEPS} steps"),
)
# each method's reference row: the K-step DDIM run the fewer-step rows are set against
SOLVER_REFERENCES = {"base": "ddim:base", "fvd": "ddim:fvd"}


@dataclass(frozen=True)
class ToyBenchConfig:
    problems: tuple[str, ...] = DEFAULT_PROBLEMS
    seeds: tuple[int, ...] = (1, 2, 3)
    n_particles: int = 1024
    num_steps: int = 50
    tune: bool = True
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS + tuple(s for sweep in VALUE_BASED_SWEEPS.values() for s in sweep)
    solver_methods: tuple[MethodSpec, ...] = SOLVER_METHODS

    def __post_init__(self) -> None:
        check_reported_seeds(self.seeds)
        for name in self.problems:
            toy_problem(name)  # raises with the list of valid names
        if self.n_particles < 2:
            raise ValueError(f"n_particles must be >= 2, got {self.n_particles}")
        for spec in self.solver_methods:  # valid before any cell runs (the CLI checks ``methods`` itself)
            if spec.method not in SOLVER_REFERENCES:
                raise ValueError(f"solver_methods: {spec.label} runs {spec.method}; the table compares "
                                 f"{', '.join(SOLVER_REFERENCES)} only")
            fv.make_config(spec.method, **sampler_params(spec, 1, self))

    @property
    def solver_only(self) -> tuple[MethodSpec, ...]:
        """The solver table's rows that the per-problem tables do not already run."""
        main = {s.label for s in self.methods}
        return tuple(s for s in self.solver_methods if s.label not in main)


def sampler_params(spec: MethodSpec, seed: int, cfg: ToyBenchConfig) -> dict[str, Any]:
    """The sampler's keyword arguments for a cell; the spec's options win (a row may set its own steps)."""
    return {"n_particles": cfg.n_particles, "num_steps": cfg.num_steps, "seed": seed, **spec.options}


def resolved(spec: MethodSpec, seed: int, cfg: ToyBenchConfig) -> str:
    """The method's full config as JSON: a cell reruns when a default it relies on changes."""
    return json.dumps(fv.make_config(spec.method, **sampler_params(spec, seed, cfg)).as_dict(), sort_keys=True)
