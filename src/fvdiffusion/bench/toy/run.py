"""`fvd toy`: every method on the exact Gaussian-mixture toy, at equal denoiser calls, over seeds.

Seed 0 is the tuning seed: the small grids in :data:`~fvdiffusion.bench.toy.config.TUNING_GRIDS`
are run on it only and the best setting of FVD and of SMC (lowest mean sliced-W2 over the
problems) enters the reported table as ``fvd-tuned`` / ``smc-tuned``. Reported seeds never
include seed 0. Every finished cell is appended to a resumable results file.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

import fvdiffusion as fv
from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.toy.config import TUNING_GRIDS, ToyBenchConfig, resolved, sampler_params
from fvdiffusion.durable import RecordLog
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import ToyProblem, toy_problem


def run_cell(problem_name: str, spec: MethodSpec, seed: int, cfg: ToyBenchConfig, keep_samples: bool) -> dict[str, Any]:
    problem = toy_problem(problem_name)
    denoiser = problem.denoiser(VPSchedule.linear(1000))
    start = time.perf_counter()
    res = fv.sample(spec.method, denoiser, problem.reward, lam=problem.lam, **sampler_params(spec, seed, cfg))
    wall = time.perf_counter() - start
    report = evaluate_against_target(res.samples, problem, seed=seed)
    row = {
        "problem": problem_name, "label": spec.label, "method": spec.method, "options": spec.options,
        "seed": seed, "resolved": resolved(spec, seed, cfg), **report.as_dict(), "reward_mean": float(res.rewards.mean()),
        "distinct_lineages": res.distinct_lineages(), **res.diversity().as_dict(), "genealogy": res.lineage.genealogy_curve(),
        "denoiser_calls": res.cost.denoiser_calls, "reward_calls": res.cost.reward_calls, "wall_seconds": wall,
    }
    if spec.method == "base":
        row.update(data_law_error(res.samples, problem, seed))
    if keep_samples:
        row["samples"] = res.samples.tolist()
    return row


def data_law_error(samples: Tensor, problem: ToyProblem, seed: int) -> dict[str, float]:
    """SW2 to the untilted data law and its exact-sample floor ratio. Why: base samples the data law,
    not π*, so a solver's error on base shows there and is lost in its distance to π*."""
    plain = replace(problem, reward=None, target=problem.mixture, target_component=None, lam=0.0)
    report = evaluate_against_target(samples, plain, seed=seed)
    return {"data_sliced_w2": report.sliced_w2, "data_floor_ratio": report.floor_ratio}


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
    n_main = (len(cfg.methods) + len(cfg.solver_only) + (2 if cfg.tune else 0)) * len(cfg.problems) * len(cfg.seeds)
    bar = tqdm(total=n_tune + n_main, desc="toy cells", disable=not progress_bar)
    step = lambda label: (bar.set_postfix_str(label[:40], refresh=False), bar.update(1))
    methods = list(cfg.methods)
    used: list[dict[str, Any]] = []
    if cfg.tune:
        tuned = tune(cfg, log, step, used)
        methods += [tuned["fvd"], tuned["smc"]]
    methods += cfg.solver_only
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
