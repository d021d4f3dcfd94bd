"""What the MNIST benchmark runs: the method rows, FK steering's released schedule, the tuning
families and their grids, and the keys that make a cell resumable.

Every table here is data: add a row, a family or a grid point and the plan, the run, the
resume keys and the report pick it up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

import fvdiffusion as fv
from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.config import CommonConfig


class PlanSizes(Protocol):
    """The fields of a benchmark config that the plan reads (``MnistBenchConfig`` has them all).

    A protocol rather than an import: the config validates itself with the plan, so importing it
    here would tie the two modules in a circle.
    """

    tune: bool
    grid_points: int
    num_steps: int
    n_particles: int
    eta: float
    families: tuple[str, ...]
    rows: tuple[str, ...]
    svdd_candidates: tuple[int, ...]
    dts_rollout_factors: tuple[int, ...]
    scaling_steps: tuple[int, ...]
    solver_steps: tuple[int, ...]
    particle_sizes: tuple[int, ...]
    batch_size: int | None
    min_populations: int
    samples_per_cell: int

    @property
    def tuning_samples(self) -> int: ...

NUM_CLASSES = 10
REAL_LABEL = "real (train)"
BON_KEEP_FRACTION = 0.5
MAX_POPULATIONS = 1000      # population_seed packs p into three decimal digits
CELL_FORMAT = 2             # in every key: rows of the first format (no per-population images) never match
SCALING_LABELS = ("base", "smc-multinomial", "fvd")
# The quality-against-wall-time sweep over N (particle_sizes): best-of-N, the strongest SMC
# scheme, VASR and FVD, each at its defaults with N particles per population.
WALL_LABELS = ("bon", "smc-systematic", "vasr", "fvd")
# The multistep-solver rows (solver_steps): FVD's defaults moved by DPM-Solver++(2M) on fewer steps,
# to set against the K-step fvd row at equal quality (issue 20 item 6). η stays the bench's: 0 is
# the ODE solver, 1 its SDE variant. UniPC, an ODE solver only, joins under η = 0.
SOLVER_TRANSITION = "dpmpp_2m"
MULTISTEP_SOLVERS = {"dpmpp_2m": ("fvd-dpmpp2m", "DPM-Solver++(2M)"), "unipc": ("fvd-unipc", "UniPC")}
# A reward call's cost relative to a denoiser call, per image, on the shipped networks (the
# reward classifier against the UNet; measured 0.08–0.12 on one CPU thread). Best-of-N at
# matched wall time spends FVD's N·K denoiser and N·K reward calls on P·K + P calls.
REWARD_TO_DENOISER_COST = 0.1


def matched_bon_pool(n_particles: int, num_steps: int) -> int:
    """Pool size P with P·(K + ρ) = N·K·(1 + ρ): best-of-N that spends FVD's wall time."""
    rho = REWARD_TO_DENOISER_COST
    return math.ceil(n_particles * num_steps * (1 + rho) / (num_steps + rho))


def describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(options.items())) or "the defaults"


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def fk_steering_options(num_steps: int) -> dict[str, Any]:
    """SMC options that reproduce FK steering's released text-to-image schedule on ``num_steps`` steps.

    Source: github.com/zacharyhorvitz/Fk-Diffusion-Steering (commit 9413005),
    text_to_image/launch.sh and generate_samples_for_paper.py: 100 sampling steps, resample at
    step indices 20, 40, 60, 80 (``--resample_frequency 20 --resample_t_start 20
    --resample_t_end 80``) and always at the last step, multinomial resampling
    (``torch.multinomial``), ``--num_particles 4``, λ = 10 (launch.sh) or 2 (paper samples).
    Translation: every 20% of the steps, from step round(0.2 K) to round(0.8 K), multinomial,
    plus our final selection on r(x0) (their last-step resampling). λ stays 1: here it is not a
    knob but the definition of the target (λ = 1 makes π* the class-conditional data law), the
    same for every method. Potential "diff", their code's default (fkd_class.FKD and
    launch_eval_runs.py ``--potential_type diff``): with resampling every few steps it
    telescopes to exactly their weights. launch.sh passes "max" instead, but our SMC adds the
    max potential at every step of the window, not only at resampling steps as their code
    does, so with an interval > 1 it would not be their potential.
    """
    every = max(1, round(num_steps / 5))
    span = max(num_steps - 1, 1)
    first, last = round(0.2 * num_steps), round(0.8 * num_steps)
    return {"potential": "diff", "scheme": "multinomial", "selection_interval": every,
            "selection_start": min(1.0, first / span), "selection_end": min(1.0, last / span)}


@dataclass(frozen=True)
class MethodRow:
    """A reported method: its sampler spec and its table (main, ablation, unsteered)."""

    spec: MethodSpec
    group: str


def method_rows(n_particles: int, num_steps: int) -> tuple[MethodRow, ...]:
    """Every method row the benchmark knows, in table order; a config picks a subset by label."""
    keep = max(1, int(n_particles * BON_KEEP_FRACTION))
    pool = matched_bon_pool(n_particles, num_steps)
    return (
        MethodRow(MethodSpec("base", "base", {}, "no reward: shows what alignment buys"), "unsteered"),
        MethodRow(MethodSpec("bon", "bon", {"top_k": keep}, f"best-of-N: each population keeps its top {keep} of "
                             f"{n_particles}"), "unsteered"),
        MethodRow(MethodSpec("bon-matched", "bon", {"n_particles": pool, "top_k": keep},
                             f"best-of-N at FVD's wall time: a pool of {pool} (reward calls counted at "
                             f"{REWARD_TO_DENOISER_COST}x a denoiser call), top {keep} kept"), "unsteered"),
        MethodRow(MethodSpec("smc-multinomial", "smc", {}, "diff potential, multinomial resampling every step"), "main"),
        MethodRow(MethodSpec("smc-fk", "smc", fk_steering_options(num_steps),
                             "FK steering's released schedule: resample every 20% of steps in [0.2, 0.8]"), "main"),
        MethodRow(MethodSpec("smc-ess", "smc", {"ess_threshold": 0.5}, "resample when ESS < N/2 (multinomial)"), "main"),
        MethodRow(MethodSpec("smc-systematic", "smc", {"scheme": "systematic"}, "systematic resampling every step"),
                  "main"),
        MethodRow(MethodSpec("smc-ess-systematic", "smc", {"ess_threshold": 0.5, "scheme": "systematic"},
                             "systematic resampling when ESS < N/2"), "main"),
        MethodRow(MethodSpec("vasr", "vasr", {}, "variance-aware systematic resampling"), "main"),
        MethodRow(MethodSpec("fvd", "fvd", {}, f"FVD's defaults ({_fvd_default_kernel()})"), "main"),
        MethodRow(MethodSpec("fvd-nu0", "fvd", {"rebirth_noise": 0.0}, "ablation: plain clones"), "ablation"),
        MethodRow(MethodSpec("fvd-multinomial", "fvd", {"parent_allocation": "multinomial"},
                             "ablation: the dead drawn i.i.d. over the excess"), "ablation"),
        MethodRow(MethodSpec("fvd-systematic", "fvd", {"parent_allocation": "systematic"},
                             "ablation: the dead shared out systematically over the excess"), "ablation"),
        MethodRow(MethodSpec("fvd-nu1", "fvd", {"rebirth_noise": 1.0}, "ablation: full rebirth noise"), "ablation"),
        MethodRow(MethodSpec("fvd-weighted", "fvd", {"parent_rule": "weighted"}, "ablation: killing rule"), "ablation"),
        MethodRow(MethodSpec("fvd-ctrl", "fvd", {"target_dead_fraction": 0.2}, "ablation: absorption controller, "
                             "alpha*=0.2"), "ablation"),
    )


def _fvd_default_kernel() -> str:
    """The rebirth kernel FVD's defaults resolve to under DDPM steps, for the row's note."""
    config = fv.make_config("fvd").as_dict()
    return describe({k: config[k] for k in ("rebirth", "rebirth_noise", "nu_schedule", "nu_by_copies") if k in config})


ALL_ROWS = tuple(r.spec.label for r in method_rows(64, 50))
MAIN_ROWS = tuple(r.spec.label for r in method_rows(64, 50) if r.group == "main")
SMC_FAMILIES = ("smc", "smc-ess", "smc-fk", "vasr")  # the "strong SMC baselines" of the claim


@dataclass(frozen=True)
class TuningFamily:
    """A tuned baseline: its sampler, its default row and its grid (first point = the defaults).

    Every family gets the same number of grid points (``MnistBenchConfig.grid_points``, the
    first points of each grid), so no method is tuned harder than another.
    """

    name: str
    method: str
    default_row: str
    grid: tuple[dict[str, Any], ...]

    def points(self, n: int) -> tuple[dict[str, Any], ...]:
        return self.grid[:n]


def tuning_families(num_steps: int) -> tuple[TuningFamily, ...]:
    """The families and their grids, most promising points first (a smaller budget keeps the head)."""
    fk = fk_steering_options(num_steps)
    fk_dense = {**fk, "selection_interval": max(1, fk["selection_interval"] // 2)}
    return (
        # FVD's kernel fields: setting any one makes the unset ones plain (samplers/fvd.py), so each
        # point below is exactly the kernel it names
        # Declared before the reported seeds ran (issue 19): the image tuning of FVD's defaults, the same
        # grid under DDPM and DDIM. Every point names the allocation and a kernel field, so the points do
        # not move when FVD's defaults change (setting one kernel field makes the unset ones plain).
        TuningFamily("fvd", "fvd", "fvd", (
            {"rebirth_noise": 0.5, "nu_by_copies": True, "parent_allocation": "multinomial"},  # the toy suite's DDPM pick
            {"rebirth_noise": 1.0, "nu_by_copies": True, "parent_allocation": "multinomial"},  # the toy suite's DDIM pick
            {"rebirth_noise": 0.0, "parent_allocation": "systematic"},                         # plain clones
            {"rebirth_noise": 0.5, "nu_by_copies": True, "parent_allocation": "systematic"},
            {"rebirth_noise": 1.0, "nu_by_copies": True, "parent_allocation": "systematic"},
            {"rebirth_noise": 1.0, "nu_schedule": "decay", "parent_allocation": "systematic"},  # full noise early only
            {"rebirth": "langevin", "parent_allocation": "systematic"},       # p_t-invariant moves (extra calls)
            {"rebirth_noise": 1.0, "parent_allocation": "systematic"},
        )),
        TuningFamily("smc", "smc", "smc-multinomial", (
            {},
            {"scheme": "systematic"},
            {"ess_threshold": 0.5, "scheme": "systematic"},
            {"ess_threshold": 0.5},
            fk,
            {**fk, "scheme": "systematic"},
            {"scheme": "systematic", "selection_interval": 5, "selection_start": 0.2},
            {"selection_interval": 5},
        )),
        TuningFamily("smc-ess", "smc", "smc-ess", (
            {"ess_threshold": 0.5},
            {"ess_threshold": 0.5, "scheme": "systematic"},
            {"ess_threshold": 0.3},
            {"ess_threshold": 0.7},
            {"ess_threshold": 0.3, "scheme": "systematic"},
            {"ess_threshold": 0.7, "scheme": "systematic"},
        )),
        TuningFamily("smc-fk", "smc", "smc-fk", (
            fk,
            fk_dense,                                                 # twice as often in the same window
            {**fk, "selection_start": 0.0, "selection_end": 1.0},     # the whole trajectory
            {**fk, "scheme": "systematic"},
            {**fk_dense, "selection_start": 0.0, "selection_end": 1.0},
            {**fk_dense, "scheme": "systematic"},
        )),
        TuningFamily("vasr", "vasr", "vasr", (
            {},
            {"selection_interval": 5},
            {"selection_start": 0.2},
            {"selection_interval": 5, "selection_start": 0.2},
            {"selection_interval": 2},
            {"selection_interval": 2, "selection_start": 0.2},
            {"selection_interval": 3},
            {"selection_interval": 3, "selection_start": 0.2},
        )),
    )


ALL_FAMILIES = tuple(f.name for f in tuning_families(50))


def tuned_label(family: str) -> str:
    return f"{family}-tuned"


@dataclass(frozen=True)
class TuningPoint:
    """One grid point of one family, run on the tuning seed."""

    family: str
    spec: MethodSpec


def tuning_points(cfg: PlanSizes) -> list[TuningPoint]:
    if not cfg.tune:
        return []
    out, seen = [], set()
    for family in selected_families(cfg):
        for options in family.points(cfg.grid_points):
            key = (family.name, json.dumps(options, sort_keys=True))
            if key in seen:  # with very few steps two schedules can coincide (e.g. FK's interval halved to 1)
                continue
            seen.add(key)
            out.append(TuningPoint(family.name, MethodSpec(f"tune:{family.name}:{describe(options)}",
                                                           family.method, dict(options))))
    return out


def selected_families(cfg: PlanSizes) -> tuple[TuningFamily, ...]:
    return tuple(f for f in tuning_families(cfg.num_steps) if f.name in cfg.families)


# --- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedMethod:
    """A reported row: its spec, its curve in the compute figure (``family``), its table
    (``group``: real, main, ablation, unsteered, tuned, value, scaling, solver, wall) and its budget
    (svdd's M, dts's rollouts, the particle methods' steps K, the sweep's N)."""

    spec: MethodSpec
    family: str
    group: str
    budget: int | None = None


def plan(cfg: PlanSizes, tuned: dict[str, MethodSpec] | None = None) -> list[PlannedMethod]:
    """Every reported row in table order; tuned rows only for the families in ``tuned``."""
    out = [PlannedMethod(MethodSpec(REAL_LABEL, "real", {}, "real training digits of class c: the floor"),
                         REAL_LABEL, "real")]
    rows = {r.spec.label: r for r in method_rows(cfg.n_particles, cfg.num_steps)}
    out += [PlannedMethod(rows[label].spec, label, rows[label].group, cfg.num_steps) for label in cfg.rows]
    for family in selected_families(cfg):
        if tuned and family.name in tuned:
            out.append(PlannedMethod(tuned[family.name], family.default_row, "tuned", cfg.num_steps))
    for m in cfg.svdd_candidates:
        out.append(PlannedMethod(MethodSpec(f"svdd-M{m}", "svdd", {"n_candidates": m}, f"{m} candidates per step"),
                                 "svdd", "value", m))
    for factor in cfg.dts_rollout_factors:
        rollouts = factor * cfg.n_particles
        out.append(PlannedMethod(MethodSpec(f"dts-R{rollouts}", "dts", {"n_rollouts": rollouts},
                                            f"{rollouts} rollouts ({factor}x N) per tree of N samples"),
                                 "dts", "value", rollouts))
    for n in cfg.particle_sizes:
        for label in WALL_LABELS:
            spec = rows[label].spec
            options = {**spec.options, "n_particles": n}
            if spec.method == "bon":
                options["top_k"] = max(1, int(n * BON_KEEP_FRACTION))
            out.append(PlannedMethod(MethodSpec(f"{label}-N{n}", spec.method, options, f"{label} with N = {n}"),
                                     label, "wall", n))
    for steps in cfg.scaling_steps:
        for label in SCALING_LABELS:
            if label in cfg.rows:
                spec = rows[label].spec
                out.append(PlannedMethod(MethodSpec(f"{label}-K{steps}", spec.method, {**spec.options, "num_steps": steps},
                                                    f"{label} with {steps} steps"), label, "scaling", steps))
    transitions = tuple(MULTISTEP_SOLVERS) if cfg.eta == 0.0 else (SOLVER_TRANSITION,)
    out += [solver_row(rows["fvd"].spec, steps, cfg.eta, transition)
            for transition in transitions for steps in cfg.solver_steps]
    return out


def solver_row(fvd: MethodSpec, steps: int, eta: float, transition: str = SOLVER_TRANSITION) -> PlannedMethod:
    """FVD's defaults on ``steps`` steps of a multistep solver: its own family, so the compute figure
    draws it apart from the DDIM/DDPM step sweep. ``eta`` (the bench's) only names the variant."""
    family, name = MULTISTEP_SOLVERS[transition]
    variant = "the ODE solver" if eta == 0.0 else f"its SDE variant, η = {eta:g}"
    spec = MethodSpec(f"{family}-K{steps}", fvd.method, {**fvd.options, "num_steps": steps, "transition": transition},
                      f"FVD's defaults with {steps} {name} steps ({variant})")
    return PlannedMethod(spec, family, "solver", steps)


# --- cells ----------------------------------------------------------------------------------

def sampler_config(spec: MethodSpec, seed: int, cfg: PlanSizes) -> CommonConfig:
    """The validated sampler config of a cell (``num_steps`` in the options overrides K)."""
    params = {"n_particles": cfg.n_particles, "num_steps": cfg.num_steps, "seed": seed, "lam": 1.0,
              "eta": cfg.eta, "batch_size": cfg.batch_size, **spec.options}
    return fv.make_config(spec.method, **params)


def population_seed(seed: int, cls: int, population: int) -> int:
    """Sampler seed of population p of cell (class, seed): the same for every method of the cell,
    so methods see the same initial noise and their comparison is paired."""
    return (seed * 100 + cls) * MAX_POPULATIONS + population


def samples_per_population(spec: MethodSpec, cfg: PlanSizes) -> int:
    """Samples a population contributes to its cell: best-of-N's top k, else its N particles,
    at most ``samples_per_cell`` (a sweep point with N above it keeps its first slots, so every
    cell's FID is measured on the same number of samples)."""
    n = spec.options["top_k"] if spec.method == "bon" else spec.options.get("n_particles", cfg.n_particles)
    return min(n, cfg.samples_per_cell)


def populations(spec: MethodSpec, cfg: PlanSizes, tuning: bool = False) -> int:
    """Independent populations pooled in a cell: enough for the sample target and, in a reported
    cell, at least ``min_populations`` (the bootstrap needs them; tuning only needs a point FID)."""
    if tuning:
        return math.ceil(cfg.tuning_samples / samples_per_population(spec, cfg))
    return max(cfg.min_populations, math.ceil(cfg.samples_per_cell / samples_per_population(spec, cfg)))


def resolved(spec: MethodSpec, seed: int, cfg: PlanSizes, tuning: bool = False) -> str:
    """Everything that determines a cell's samples, as JSON: a cell reruns when any of it changes.

    The micro-batch size is left out: it does not change results, so a run may resume with
    another one (e.g. on another device).
    """
    n_pop = populations(spec, cfg, tuning)
    if spec.method == "real":
        return json.dumps({"format": CELL_FORMAT, "method": "real", "split": "train", "populations": n_pop,
                           "per_population": cfg.n_particles}, sort_keys=True)
    config = sampler_config(spec, seed, cfg).as_dict()
    config.pop("batch_size")
    config.update(format=CELL_FORMAT, method=spec.method, populations=n_pop,
                  per_population=samples_per_population(spec, cfg))
    return json.dumps(config, sort_keys=True)


def estimated_calls(spec: MethodSpec, cfg: PlanSizes, tuning: bool = False) -> int:
    """Denoiser calls of a cell (exact for particle methods without extra moves and for svdd;
    an upper bound for dts; a lower bound for FVD's Langevin rebirth)."""
    if spec.method == "real":
        return 0
    from fvdiffusion.samplers.svdd import svdd_cost

    config = sampler_config(spec, 1, cfg)
    n, k = config.n_particles, config.num_steps
    if spec.method == "svdd":
        per_population = svdd_cost(n, k, config.n_candidates)["denoiser_calls"]
    elif spec.method in ("dts", "dts*"):
        per_population = min(config.n_rollouts * k, config.node_budget)
    else:
        per_population = n * k
    return populations(spec, cfg, tuning) * per_population
