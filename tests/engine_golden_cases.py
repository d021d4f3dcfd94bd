"""The small runs whose outputs are pinned in tests/golden/engine_outputs.safetensors."""

from __future__ import annotations

import torch

import fvdiffusion as fv
from fvdiffusion.testbeds import toy_problem
from fvdiffusion.schedule import VPSchedule

SIZE = dict(n_particles=24, num_steps=8, seed=3)

CASES: dict[str, tuple[str, str, dict]] = {
    "base": ("base", "gmm2d-component", {}),
    "bon": ("bon", "gmm2d-component", {}),
    "smc_multinomial": ("smc", "gmm2d-component", {}),
    "smc_systematic_ess": ("smc", "gmm2d-linear", {"scheme": "systematic", "ess_threshold": 0.5}),
    "smc_ddim": ("smc", "gmm8d-component", {"eta": 0.0}),
    "vasr": ("vasr", "gmm2d-linear", {}),
    # the kernels FVD's defaults resolved to when these outputs were recorded, named in full so
    # that a change of the defaults (issue 19) does not move a pinned run
    "fvd": ("fvd", "gmm2d-component", {"rebirth_noise": 0.5, "nu_by_copies": True, "parent_allocation": "multinomial"}),
    "fvd_ddim": ("fvd", "gmm8d-linear", {"eta": 0.0, "rebirth_noise": 1.0, "nu_by_copies": True,
                                         "parent_allocation": "multinomial"}),
    "fvd_controller_level": ("fvd", "gmm2d-component", {"potential": "level", "target_dead_fraction": 0.2,
                                                        "parent_allocation": "multinomial"}),
    "fvd_langevin": ("fvd", "gmm2d-linear", {"rebirth": "langevin", "rebirth_noise": 0.5,
                                             "parent_allocation": "multinomial"}),
    # the systematic allocation of the dead (issue 19), recorded when it landed
    "fvd_systematic": ("fvd", "gmm2d-linear", {"rebirth_noise": 0.5, "nu_by_copies": True,
                                               "parent_allocation": "systematic"}),
    # transitions other than DDIM (issue 20), recorded when they landed; log Z pinned with them
    "fvd_dpmpp_2m": ("fvd", "gmm2d-component", {"eta": 0.0, "transition": "dpmpp_2m", "rebirth_noise": 1.0,
                                                "nu_by_copies": True, "parent_allocation": "multinomial"}),
    "smc_dpmpp_2m_sde": ("smc", "gmm2d-linear", {"eta": 1.0, "transition": "dpmpp_2m", "scheme": "systematic"}),
    # UniPC (recorded when it landed, after issue 20): clones carry two x̂0, the last x and the order
    "fvd_unipc": ("fvd", "gmm2d-component", {"eta": 0.0, "transition": "unipc", "rebirth_noise": 1.0,
                                             "nu_by_copies": True, "parent_allocation": "multinomial"}),
    "smc_ddpm_clip": ("smc", "gmm2d-linear", {"transition": "ddpm", "clip_x0": 1.0}),
    "svdd": ("svdd", "gmm2d-component", {"n_candidates": 3}),
    "dts": ("dts", "gmm2d-component", {"n_rollouts": 48}),
    "dts_star": ("dts*", "gmm2d-linear", {"n_rollouts": 48}),
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    method, problem_name, options = CASES[name]
    problem = toy_problem(problem_name)
    res = fv.sample(method, problem.denoiser(VPSchedule.linear(1000)), problem.reward, lam=problem.lam,
                    **SIZE, **options)
    steps = res.lineage.num_steps
    ancestors = torch.stack([res.lineage.ancestors_at(k) for k in range(1, steps + 1)]) if steps else \
        torch.zeros(0, dtype=torch.long)
    return {
        "samples": res.samples.detach().cpu(),
        "rewards": res.rewards.detach().cpu(),
        "log_weights": res.log_weights.detach().cpu(),
        "ancestors": ancestors.to(torch.int64),
        "denoiser_calls": torch.tensor([res.cost.denoiser_calls], dtype=torch.int64),
        **({"log_z": torch.tensor([res.log_z], dtype=torch.float64)} if res.log_z is not None else {}),
    }
