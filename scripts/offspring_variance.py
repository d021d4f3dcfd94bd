"""Per-step offspring-count variance of every selection scheme on the exact mixtures (issue 19 item 2).

For each scheme, mean over selection steps and seeds 1-3 of trace[k].offspring_var = mean_i (O_i - N W_i)^2,
N = 1024, K = 50, under DDPM and DDIM eta = 0. Prints a markdown table:
    OMP_NUM_THREADS=1 python scripts/offspring_variance.py
"""

from __future__ import annotations

import torch

import fvdiffusion as fv
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

SCHEMES = {
    "fvd, multinomial allocation": ("fvd", {"parent_allocation": "multinomial"}),
    "fvd, systematic allocation": ("fvd", {"parent_allocation": "systematic"}),
    "smc, multinomial": ("smc", {"scheme": "multinomial"}),
    "smc, systematic": ("smc", {"scheme": "systematic"}),
    "smc, residual": ("smc", {"scheme": "residual"}),
    "vasr (systematic on w·exp(λr))": ("vasr", {}),
}
PROBLEMS = ("gmm8d-component", "rare16d-component", "gmm8d-linear")


def main() -> None:
    torch.set_num_threads(1)
    header = "| scheme | " + " | ".join(f"{p} {s}" for p in PROBLEMS for s in ("DDPM", "DDIM")) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(PROBLEMS)))
    for label, (method, options) in SCHEMES.items():
        cells = []
        for name in PROBLEMS:
            problem = toy_problem(name)
            den = problem.denoiser(VPSchedule.linear(1000))
            for eta in (1.0, 0.0):
                values = [row.offspring_var for seed in (1, 2, 3)
                          for row in fv.sample(method, den, problem.reward, n_particles=1024, num_steps=50, seed=seed,
                                               lam=problem.lam, eta=eta, **options).trace if row.selected]
                cells.append(f"{sum(values) / len(values):.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
