"""Multistep solvers at 20 steps against DDIM at 50 and 20 on the exact toy mixtures (base sampler).

Sliced W2 to the exact law, 4096 samples, seeds 1-3, the engine's own grid; one torch thread:
    OMP_NUM_THREADS=1 python scripts/multistep_toy_check.py
"""

import torch, fvdiffusion as fv
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem
from fvdiffusion.metrics.targets import evaluate_against_target
torch.set_num_threads(1)
S = VPSchedule.linear(1000)
for prob in ("gmm2d-base", "gmm8d-base"):
    p = toy_problem(prob)
    for name, eta, k in (("ddim", 0.0, 50), ("dpmpp_2m", 0.0, 20), ("unipc", 0.0, 20), ("ddim", 0.0, 20)):
        vals = []
        for seed in (1, 2, 3):
            r = fv.sample("base", p.denoiser(S), None, n_particles=4096, num_steps=k, seed=seed, eta=eta,
                          transition=name)
            vals.append(evaluate_against_target(r.samples, p, seed=seed).sliced_w2)
        print(prob, name, k, [round(v, 3) for v in vals], round(sum(vals)/3, 3))
