"""DTS on the exact toy, by budget: root soft value against Monte-Carlo log Z, and SW2 / floor.

The root value estimates (1/λ) log E[exp(λ r)] over the base K-step sampler, so the reference
is that Monte-Carlo number (400,000 base samples at the same K), not the continuous-time log Z.
Same cells as the `fvd toy` dts sweep (N = 1024, K = 50, node_budget = 2,000,000, λ of the
problem, seeds 1–3), with the bench's metric. Prints one Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/dts_convergence.py
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

import fvdiffusion as fv
from fvdiffusion.bench.common.stats import fmt_pm, markdown_table, mean_std
from fvdiffusion.bench.toy.config import DEFAULT_PROBLEMS
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import ToyProblem, toy_problem


@dataclass
class Cell:
    root_value: float
    floor_ratio: float
    denoiser_calls: int


def monte_carlo_log_z(problem: ToyProblem, denoiser, num_steps: int, n: int = 400_000) -> float:
    """(1/λ) log mean exp(λ r) over n base samples of the same K-step sampler."""
    r = fv.sample("base", denoiser, problem.reward, n_particles=n, num_steps=num_steps, seed=12345).rewards
    return float(torch.logsumexp(problem.lam * r, 0) - math.log(n)) / problem.lam


def run_cell(problem: ToyProblem, denoiser, rollouts: int, seed: int, args: argparse.Namespace) -> Cell:
    res = fv.sample("dts", denoiser, problem.reward, n_particles=args.particles, num_steps=args.steps, seed=seed,
                    lam=problem.lam, n_rollouts=rollouts, node_budget=2_000_000)
    report = evaluate_against_target(res.samples, problem, seed=seed)
    return Cell(res.extras["root_value"], report.floor_ratio, res.cost.denoiser_calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(DEFAULT_PROBLEMS))
    parser.add_argument("--rollouts", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--particles", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, start = [], time.perf_counter()
    for name in args.problems:
        problem = toy_problem(name)
        denoiser = problem.denoiser(VPSchedule.linear(1000))
        log_z = monte_carlo_log_z(problem, denoiser, args.steps)
        for rollouts in args.rollouts:
            cells = [run_cell(problem, denoiser, rollouts, seed, args) for seed in args.seeds]
            values = [c.root_value for c in cells]
            error = mean_std([abs(v - log_z) for v in values])[0]
            calls = round(mean_std([c.denoiser_calls for c in cells])[0])
            rows.append([name, rollouts, fmt_pm(values), f"{log_z:.3f}", f"{error:.3f}",
                         fmt_pm([c.floor_ratio for c in cells], 2), calls])
            print(f"{name} R={rollouts} done at {time.perf_counter() - start:.0f}s", flush=True)
    print(markdown_table(["problem", "rollouts", "root value", "MC log Z (same K)", "mean |error|", "SW2 / floor",
                          "denoiser calls"], rows))


if __name__ == "__main__":
    main()
