import pytest
import torch

from fvdiffusion.bench.toy_problems import toy_problem
from fvdiffusion.schedule import VPSchedule


@pytest.fixture(scope="session")
def gmm2d():
    """The 2-D component-posterior toy problem and its exact denoiser."""
    problem = toy_problem("gmm2d-component")
    return problem, problem.denoiser(VPSchedule.linear(1000))


# The suite runs many small tensor ops; on a 2-core machine shared with other work, torch's
# intra-op threads cost far more than they give, so the tests use one.
torch.set_num_threads(1)
