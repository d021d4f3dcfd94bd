"""log Ẑ of each population method against the exact log Z of the toy mixtures (docs/method.md, "log Z").

    OMP_NUM_THREADS=1 python scripts/log_z_check.py            # N = 4096, K = 50, seeds 1-3

Z = E_p[exp(λ r(x0))]: Σ_c w_c exp(aᵀμ_c + aᵀΣ_c a / 2) for the linear rewards, w_k for the component
rewards (r = log p(k | x)); λ = 1. Prints a markdown table of log Ẑ − log Z (mean and range over seeds).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import fvdiffusion as fv
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "core"))
from test_log_z import exact_log_z  # noqa: E402  (one definition of the exact value)

ROWS = [
    ("smc, systematic every step", "smc", dict(scheme="systematic")),
    ("smc, multinomial, FK 'max' potential", "smc", dict(scheme="multinomial", potential="max")),
    ("smc, ESS < 0.5, DDIM", "smc", dict(scheme="systematic", ess_threshold=0.5, eta=0.0)),
    ("vasr", "vasr", {}),
    ("fvd default (DDPM)", "fvd", {}),
    ("fvd default (DDIM, nu = 1 by copies)", "fvd", dict(eta=0.0)),
    ("fvd plain clones (DDIM)", "fvd", dict(eta=0.0, rebirth_noise=0.0)),
]
PROBLEMS = ["gmm2d-linear", "gmm8d-linear", "gmm2d-component", "gmm8d-component"]


def main() -> None:
    torch.set_num_threads(1)
    seeds = (1, 2, 3)
    print("| method | " + " | ".join(PROBLEMS) + " |")
    print("|---|" + "---|" * len(PROBLEMS))
    for label, method, options in ROWS:
        cells = []
        for name in PROBLEMS:
            problem = toy_problem(name)
            truth = exact_log_z(problem)
            errors = [fv.sample(method, problem.denoiser(VPSchedule.linear(1000)), problem.reward, lam=problem.lam,
                                n_particles=4096, num_steps=50, seed=seed, **options).log_z - truth for seed in seeds]
            cells.append(f"{sum(errors) / len(errors):+.3f} [{min(errors):+.3f}, {max(errors):+.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nexact log Z: " + ", ".join(f"{n} {exact_log_z(toy_problem(n)):.3f}" for n in PROBLEMS)
          + f"; seeds {seeds}, N = 4096, K = 50, threads 1")


if __name__ == "__main__":
    main()
