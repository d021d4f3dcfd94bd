"""Populations of every method at the reference's K and λ: one fsynced row per population.

Each population runs through the engine (``fvdiffusion.sample``) with the testbed's reward —
evaluated on x̂0 during sampling and on x0 at the end — N particles and one reported seed. Its
row keeps the weighted mean of every statistic over the final population (weights: the
result's final log-weights, uniform after a final selection), its diversity and its cost.
Rows are keyed by the resolved method config, so a changed default (e.g. FVD's) reruns that
method and nothing else; ``results.jsonl`` resumes at the first missing population.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.truth.config import CompareConfig
from fvdiffusion.bench.truth.testbed import TruthTestbed
from fvdiffusion.durable import RecordLog, read_records

KEY_FIELDS = ("testbed", "sampler", "steps", "lam", "n_particles", "label", "seed", "resolved", "statistics")


def results_path(out_dir: Path) -> Path:
    return Path(out_dir) / "results.jsonl"


@dataclass(frozen=True, eq=False)
class Population:
    """What a run returns for scoring: the final samples, their log-weights, what it cost."""

    samples: Tensor
    log_weights: Tensor
    denoiser_calls: int
    reward_calls: int
    distinct_samples: int


PopulationRunner = Callable[[TruthTestbed, MethodSpec, CompareConfig, int], Population]


def engine_population(testbed: TruthTestbed, spec: MethodSpec, cfg: CompareConfig, seed: int) -> Population:
    """One population of ``spec`` through ``fvdiffusion.sample``."""
    import fvdiffusion as fv

    result = fv.sample(spec.method, testbed.denoiser, testbed.reward, n_particles=cfg.n_particles,
                       num_steps=cfg.steps, seed=seed, lam=cfg.lam, eta=cfg.eta, batch_size=cfg.batch_size,
                       **spec.options)
    return Population(result.samples, result.log_weights, result.cost.denoiser_calls, result.cost.reward_calls,
                      result.diversity().distinct_samples)


def resolved(spec: MethodSpec, cfg: CompareConfig, seed: int) -> str:
    """The full config the engine runs (defaults filled in), as the row's identity."""
    import fvdiffusion as fv

    config = fv.make_config(spec.method, n_particles=cfg.n_particles, num_steps=cfg.steps, seed=seed, lam=cfg.lam,
                            eta=cfg.eta, batch_size=cfg.batch_size, **spec.options)
    values = config.as_dict()
    values.pop("batch_size", None)  # results do not depend on the micro-batch
    return json.dumps({"method": spec.method, **values}, sort_keys=True)


def population_key(testbed: TruthTestbed, spec: MethodSpec, cfg: CompareConfig, seed: int) -> dict[str, Any]:
    return {"testbed": testbed.name, "sampler": cfg.sampler, "steps": cfg.steps, "lam": float(cfg.lam),
            "n_particles": cfg.n_particles, "label": spec.label, "seed": seed,
            "resolved": resolved(spec, cfg, seed), "statistics": list(testbed.names)}


def population_row(testbed: TruthTestbed, spec: MethodSpec, cfg: CompareConfig, seed: int,
                   population: Population, wall_seconds: float) -> dict[str, Any]:
    """The row of one population: weighted statistic means (final weights), diversity, cost."""
    weights = torch.softmax(population.log_weights.detach().to("cpu", torch.float64), 0)
    means = weights @ testbed.statistics(population.samples)
    return {**population_key(testbed, spec, cfg, seed), "method": spec.method, "options": spec.options,
            "means": {name: float(means[j]) for j, name in enumerate(testbed.names)},
            "final_ess": float(1.0 / weights.square().sum()), "distinct_samples": population.distinct_samples,
            "denoiser_calls": population.denoiser_calls, "reward_calls": population.reward_calls,
            "wall_seconds": wall_seconds, "torch": torch.__version__}


def run_compare(testbed: TruthTestbed, cfg: CompareConfig, out_dir: Path, runner: PopulationRunner = engine_population,
                progress_bar: bool = True) -> list[dict[str, Any]]:
    """Run every missing (method, seed) population; returns the rows of this config."""
    from tqdm.auto import tqdm

    log = RecordLog(results_path(out_dir), KEY_FIELDS)
    cells = [(spec, seed) for seed in cfg.seeds for spec in cfg.methods]
    # every key (hence every method config) is built, and so validated, before the first run
    missing = [(spec, seed) for spec, seed in cells if not log.done(**population_key(testbed, spec, cfg, seed))]
    with tqdm(total=len(cells), initial=len(cells) - len(missing), desc=f"populations ({cfg.sampler})", unit="run",
              disable=not progress_bar, dynamic_ncols=True) as bar:
        for spec, seed in missing:
            bar.set_postfix_str(f"{spec.label} seed {seed}")
            start = time.perf_counter()
            population = runner(testbed, spec, cfg, seed)
            log.append(population_row(testbed, spec, cfg, seed, population, time.perf_counter() - start))
            bar.update(1)
    return load_rows(testbed, cfg, out_dir)


def load_rows(testbed: TruthTestbed, cfg: CompareConfig, out_dir: Path) -> list[dict[str, Any]]:
    """The finished rows of ``cfg`` in ``results.jsonl``, read-only (the latest row of a key wins)."""
    records, _ = read_records(results_path(out_dir))
    wanted = {}
    for spec in cfg.methods:
        for seed in cfg.seeds:
            wanted[_key(population_key(testbed, spec, cfg, seed))] = (spec.label, seed)
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for row in records:
        cell = wanted.get(_key(row))
        if cell is not None:
            found[cell] = row
    return [found[(spec.label, seed)] for spec in cfg.methods for seed in cfg.seeds if (spec.label, seed) in found]


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row.get(field) for field in KEY_FIELDS], sort_keys=True)
