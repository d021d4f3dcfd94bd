"""Exact problems with known targets, used by tests, metrics and benchmarks.

A testbed is a data law with an exact denoiser, a reward and the exact reward-tilted
target, so that any sampler's output can be measured against the truth. ``flow`` gives the same
data laws as flow-matching (rectified-flow) models: their exact velocity fields. Testbeds sit
below metrics and the harness: they import denoisers, rewards and the schedule only.
"""

from fvdiffusion.testbeds.flow import GaussianMixtureVelocity, flow_denoiser, flow_law, flow_posterior_mean_x0
from fvdiffusion.testbeds.mixtures import (
    LINEAR_REWARD_SCALE,
    RARE_WEIGHTS,
    TOY_PROBLEMS,
    ToyProblem,
    base_problem,
    mixture_2d,
    mixture_nd,
    mixture_rare,
    toy_problem,
)

__all__ = [
    "ToyProblem", "toy_problem", "base_problem", "TOY_PROBLEMS",
    "mixture_2d", "mixture_nd", "mixture_rare", "RARE_WEIGHTS", "LINEAR_REWARD_SCALE",
    "flow_denoiser", "flow_law", "flow_posterior_mean_x0", "GaussianMixtureVelocity",
]
