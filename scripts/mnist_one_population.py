"""Time one MNIST population of one method (class 2, N = 32, K = 20, one torch thread).

Used to compare wall time of value-based search and FVD at matched FID on a quiet machine:
    OMP_NUM_THREADS=1 python scripts/mnist_one_population.py fvd
    OMP_NUM_THREADS=1 python scripts/mnist_one_population.py svdd n_candidates=4
    OMP_NUM_THREADS=1 python scripts/mnist_one_population.py dts n_rollouts=512
"""

from __future__ import annotations

import json
import sys

import torch

import fvdiffusion as fv
from fvdiffusion.rewards.classifier import ClassifierReward
from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    method, options = argv[0], {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv[1:])}
    denoiser = load_ddpm()
    reward = ClassifierReward(load_reward_classifier(), 2)
    res = fv.sample(method, denoiser, reward, n_particles=32, num_steps=20, seed=1, lam=1.0, progress=False, **options)
    print(json.dumps({"method": method, **options, "denoiser_calls": res.cost.denoiser_calls,
                      "wall_seconds": res.cost.wall_seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
