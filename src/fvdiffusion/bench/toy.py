"""`fvd toy`: every method on the exact Gaussian-mixture toy, at equal denoiser calls, over seeds.

Seed 0 is the tuning seed: the small grids in :data:`TUNING_GRIDS` are run on it only and
the best setting of FVD and of SMC (lowest mean sliced-W2 over the problems) enters the
reported table as ``fvd-tuned`` / ``smc-tuned``. Reported seeds never include seed 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fvdiffusion as fv
from fvdiffusion.durable import RecordLog
from fvdiffusion.bench.stats import fmt_pm, markdown_table, mean_std
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

TUNING_SEED = 0


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


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


@dataclass(frozen=True)
class ToyBenchConfig:
    problems: tuple[str, ...] = DEFAULT_PROBLEMS
    seeds: tuple[int, ...] = (1, 2, 3)
    n_particles: int = 1024
    num_steps: int = 50
    tune: bool = True
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS + tuple(s for sweep in VALUE_BASED_SWEEPS.values() for s in sweep)

    def __post_init__(self) -> None:
        if TUNING_SEED in self.seeds:
            raise ValueError(f"seeds must not contain the tuning seed {TUNING_SEED}: got {self.seeds}")
        for name in self.problems:
            toy_problem(name)  # raises with the list of valid names
        if self.n_particles < 2:
            raise ValueError(f"n_particles must be >= 2, got {self.n_particles}")


def resolved(spec: MethodSpec, seed: int, cfg: ToyBenchConfig) -> str:
    """The method's full config as JSON: a cell reruns when a default it relies on changes."""
    config = fv.make_config(spec.method, n_particles=cfg.n_particles, num_steps=cfg.num_steps, seed=seed,
                            **spec.options)
    return json.dumps(config.as_dict(), sort_keys=True)


def run_cell(problem_name: str, spec: MethodSpec, seed: int, cfg: ToyBenchConfig, keep_samples: bool) -> dict[str, Any]:
    problem = toy_problem(problem_name)
    denoiser = problem.denoiser(VPSchedule.linear(1000))
    start = time.perf_counter()
    res = fv.sample(spec.method, denoiser, problem.reward, n_particles=cfg.n_particles, num_steps=cfg.num_steps,
                    seed=seed, lam=problem.lam, **spec.options)
    wall = time.perf_counter() - start
    report = evaluate_against_target(res.samples, problem, seed=seed)
    row = {
        "problem": problem_name, "label": spec.label, "method": spec.method, "options": spec.options,
        "seed": seed, "resolved": resolved(spec, seed, cfg), **report.as_dict(), "reward_mean": float(res.rewards.mean()),
        "distinct_lineages": res.distinct_lineages(), **res.diversity().as_dict(), "genealogy": res.lineage.genealogy_curve(),
        "denoiser_calls": res.cost.denoiser_calls, "reward_calls": res.cost.reward_calls, "wall_seconds": wall,
    }
    if keep_samples:
        row["samples"] = res.samples.tolist()
    return row


def tune(cfg: ToyBenchConfig, log: RecordLog, progress: Callable[[str], None],
         used: list[dict[str, Any]]) -> dict[str, MethodSpec]:
    """Grid search on the tuning seed; returns the chosen fvd and smc settings."""
    chosen = {}
    for method, grid in TUNING_GRIDS.items():
        scores = []
        for options in grid:
            label = f"tune:{method}:" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))
            spec = MethodSpec(label, method, options)
            sw2s = []
            for problem in cfg.problems:
                key = dict(problem=problem, label=label, seed=TUNING_SEED, resolved=resolved(spec, TUNING_SEED, cfg))
                if not log.done(**key):
                    log.append(run_cell(problem, spec, TUNING_SEED, cfg, keep_samples=False))
                progress(label)
                row = log.find(**key)
                used.append(row)
                sw2s.append(row["floor_ratio"])
            scores.append((sum(sw2s) / len(sw2s), options))
        best = min(scores, key=lambda s: s[0])[1]
        chosen[method] = MethodSpec(f"{method}-tuned", method, best, "best on tuning seed 0: " +
                                    ", ".join(f"{k}={v}" for k, v in sorted(best.items())))
    return chosen


def run_toy_bench(cfg: ToyBenchConfig, out_dir: Path, progress_bar: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the whole benchmark; every finished cell is appended to results.jsonl."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    log = RecordLog(out_dir / "results.jsonl", ("problem", "label", "seed", "resolved"))
    n_tune = sum(len(g) for g in TUNING_GRIDS.values()) * len(cfg.problems) if cfg.tune else 0
    n_main = (len(cfg.methods) + (2 if cfg.tune else 0)) * len(cfg.problems) * len(cfg.seeds)
    bar = tqdm(total=n_tune + n_main, desc="toy cells", disable=not progress_bar)
    step = lambda label: (bar.set_postfix_str(label[:40], refresh=False), bar.update(1))
    methods = list(cfg.methods)
    used: list[dict[str, Any]] = []
    if cfg.tune:
        tuned = tune(cfg, log, step, used)
        methods += [tuned["fvd"], tuned["smc"]]
    rows = []
    for problem in cfg.problems:
        for spec in methods:
            for seed in cfg.seeds:
                key = dict(problem=problem, label=spec.label, seed=seed, resolved=resolved(spec, seed, cfg))
                if not log.done(**key):
                    keep = problem.startswith("gmm2d") and seed == cfg.seeds[0]
                    row = run_cell(problem, spec, seed, cfg, keep_samples=keep)
                    row["note"] = spec.note
                    log.append(row)
                step(spec.label)
                rows.append(log.find(**key))
    bar.close()
    log.keep_only(used + rows)
    return rows


def toy_table(rows: list[dict[str, Any]], cfg: ToyBenchConfig) -> str:
    """One Markdown table per problem; rows in benchmark order, ± is the std over seeds."""
    out = [f"N = {cfg.n_particles} particles, {cfg.num_steps} steps, seeds {list(cfg.seeds)} "
           f"(tuning seed {TUNING_SEED} not reported). SW2 = sliced Wasserstein-2 to 8192 exact target "
           "samples; floor = the same for an exact sample set of size N; distinct = distinct final "
           "samples (copies counted once); K/2 anc. = distinct step-K/2 ancestors among them.\n"]
    header = ["method", "SW2", "SW2 / floor", "mass on target", "mean err", "cov err", "reward", "distinct", "K/2 anc.",
              "denoiser calls", "wall s", "note"]
    for problem in cfg.problems:
        prows = [r for r in rows if r["problem"] == problem]
        labels = list(dict.fromkeys(r["label"] for r in prows))
        table = []
        for label in labels:
            cell = [r for r in prows if r["label"] == label]
            mass = [r["mass_on_target"] for r in cell if r["mass_on_target"] is not None]
            table.append([
                label, fmt_pm([r["sliced_w2"] for r in cell]), fmt_pm([r["floor_ratio"] for r in cell], 2),
                fmt_pm(mass, 3) if mass else "–", fmt_pm([r["mean_error"] for r in cell]),
                fmt_pm([r["cov_error"] for r in cell], 2), fmt_pm([r["reward_mean"] for r in cell], 2),
                fmt_pm([r.get("distinct_samples", float("nan")) for r in cell], 0),
                fmt_pm([r.get("distinct_midpoint_ancestors", float("nan")) for r in cell], 0), cell[0]["denoiser_calls"],
                f"{mean_std([r['wall_seconds'] for r in cell])[0]:.2f}", cell[0].get("note", ""),
            ])
        floor = mean_std([r["exact_floor"] for r in prows])[0]
        out.append(f"\n### {problem}\n\nexact-sample floor SW2 = {floor:.4f}\n\n" + markdown_table(header, table)
                   + budget_table(rows, problem))
    return "".join(out)


def budget_to_match(rows: list[dict[str, Any]], problem: str, family: str, reference: str = "fvd") -> list[Any]:
    """Smallest swept budget at which ``family`` reaches the reference method's mean SW2."""
    ref = [r for r in rows if r["problem"] == problem and r["label"] == reference]
    if not ref:
        return [family, "–", "–", "–", "–"]
    ref_sw2 = mean_std([r["sliced_w2"] for r in ref])[0]
    ref_calls = ref[0]["denoiser_calls"]
    ref_wall = mean_std([r["wall_seconds"] for r in ref])[0]
    best = None
    for spec in VALUE_BASED_SWEEPS[family]:
        cell = [r for r in rows if r["problem"] == problem and r["label"] == spec.label]
        if not cell:
            continue
        sw2 = mean_std([r["sliced_w2"] for r in cell])[0]
        calls = mean_std([r["denoiser_calls"] for r in cell])[0]
        wall = mean_std([r["wall_seconds"] for r in cell])[0]
        if best is None or sw2 < best[1]:
            best = (spec.label, sw2, calls)
        if sw2 <= ref_sw2:
            return [family, f"{calls:,.0f} ({spec.label})", f"{calls / ref_calls:.1f}×", f"{sw2:.3f}",
                    f"{wall / ref_wall:.1f}×"]
    if best is None:
        return [family, "–", "–", "–", "–"]
    return [family, f"not reached (best {best[0]}: {best[2]:,.0f} calls)", "–", f"{best[1]:.3f}", "–"]


def budget_table(rows: list[dict[str, Any]], problem: str) -> str:
    ref = [r for r in rows if r["problem"] == problem and r["label"] == "fvd"]
    if not ref:
        return ""
    ref_sw2 = mean_std([r["sliced_w2"] for r in ref])[0]
    header = ["value-based method", "denoiser calls to reach FVD's SW2", "× FVD's calls", "SW2 there",
              "wall time × FVD's"]
    table = [budget_to_match(rows, problem, family) for family in VALUE_BASED_SWEEPS]
    return (f"\nFVD: SW2 {ref_sw2:.3f} with {ref[0]['denoiser_calls']:,} denoiser calls. "
            "Budgets swept: svdd M ∈ {2, 4, 8, 16} candidates, dts rollouts ∈ {256, 1024, 4096, 16384}.\n\n"
            + markdown_table(header, table))
