"""diffusers' multistep and sigma-space schedulers run natively: align(method="base") reproduces pipe(...).

Golden: a tiny SD pipeline with ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2),
``UniPCMultistepScheduler`` (bh2, order 2, corrector on) and ``EulerDiscreteScheduler`` on whole
training steps gives the latents of ``pipe(prompt, generator=...)`` at 1, 4 and 25 steps, with no
SchedulerReplacedWarning. A run of each transition's steps equals the scheduler's ``step()`` calls
(the ancestral ones with the same noise). FVD and SMC run with them; what is not covered (UniPC's
bh1 or order 3, LMS, ...) is still replaced with a warning naming it.
"""

import copy
import sys
from inspect import signature
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)
from tiny_diffusers import sd  # noqa: E402,F401  (module fixture)

from fvdiffusion.errors import SchedulerReplacedWarning  # noqa: E402
from fvdiffusion.integrations.diffusers import align, schedule_from_scheduler  # noqa: E402
from fvdiffusion.integrations.diffusers.timesteps import scheduler_grid  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402
from fvdiffusion.config import CommonConfig  # noqa: E402
from fvdiffusion.schedule import Prediction  # noqa: E402
from fvdiffusion.transitions import make_transition  # noqa: E402

PROMPT = "a photo of the sea"
N = 2
TRANSITION = {"DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc",
              "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler"}


def with_scheduler(pipe, name, **options):
    import diffusers

    out = copy.copy(pipe)  # the same modules, another scheduler
    out.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    return out


def pipe_latents(pipe, steps, seed=3):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=2.0, num_images_per_prompt=N,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def aligned(pipe, steps, seed=3, method="base", **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SchedulerReplacedWarning)  # stepped natively: no warning
        return align(pipe, PROMPT, Brightness(), method=method, num_images_per_prompt=N, num_inference_steps=steps,
                     guidance_scale=2.0, generator=torch.Generator().manual_seed(seed), output_type="latent",
                     **options)


@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("name, options", [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
])
def test_base_reproduces_the_pipeline_with_its_own_scheduler(sd, name, options, steps):
    pipe = with_scheduler(sd, name, **options)
    expected = pipe_latents(pipe, steps)
    out = aligned(pipe, steps)
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-4, atol=1e-4)
    assert out.result.config["transition"] == TRANSITION[name]
    assert out.result.config["eta"] == 0.0


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_data_space_solver_with_thresholding_is_native_and_applies_it(sd, name):
    pipe = with_scheduler(sd, name, thresholding=True, sample_max_value=1.5)
    expected = pipe_latents(pipe, 4)
    out = aligned(pipe, 4)
    assert out.result.config["dynamic_threshold"] == 0.995
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-4, atol=1e-4)
    plain = aligned(with_scheduler(sd, name), 4)
    assert not torch.allclose(plain.result.samples, out.result.samples, atol=1e-4)


@pytest.mark.parametrize("steps", [2, 6])
@pytest.mark.parametrize("name, eta", [("EulerDiscreteScheduler", 0.0), ("EulerAncestralDiscreteScheduler", 1.0),
                                       ("DPMSolverMultistepScheduler", 0.0), ("UniPCMultistepScheduler", 0.0)])
def test_a_run_of_transition_steps_equals_the_schedulers_steps(name, eta, steps):
    """Feed the same x̂0 sequence to the scheduler (as an ε prediction) and to the transition: same path."""
    import diffusers

    scheduler = getattr(diffusers, name)(timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    schedule = schedule_from_scheduler(scheduler)
    grid = scheduler_grid(scheduler, steps, schedule).grid
    transition = make_transition(CommonConfig(num_steps=steps, eta=eta, transition=TRANSITION[name]), grid)
    gen = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, 4, generator=gen) for _ in range(steps)]
    x_vp = torch.randn(3, 4, generator=gen)
    # diffusers' Euler works on x/√ᾱ (the model sees it scaled back to x); DPM-Solver on x itself
    sample = x_vp / grid[0].alpha_bar ** 0.5 if "Euler" in name else x_vp.clone()
    x = x_vp.clone()
    history = transition.initial_history(x)
    for i, (t, info) in enumerate(zip(scheduler.timesteps, grid)):
        a = info.alpha_bar
        eps = (x - a**0.5 * targets[i]) / (1 - a) ** 0.5          # the ε that makes x̂0 = targets[i]
        model_in = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        torch.testing.assert_close(model_in, x, rtol=1e-4, atol=1e-5)  # the model sees the engine's x_t
        noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(50 + i))
        takes_generator = "generator" in signature(scheduler.step).parameters  # UniPC's step draws nothing
        extra = {"generator": torch.Generator().manual_seed(50 + i)} if takes_generator else {}
        sample = scheduler.step(eps, t, sample, **extra).prev_sample
        moved = transition.step(info, x, Prediction(x0=targets[i], eps=eps), history, noise)
        x, history = moved.x, moved.history
        a_next = info.alpha_bar_prev
        expected = sample * a_next ** 0.5 if "Euler" in name else sample
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4, msg=f"step {i}")


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("method", ["fvd", "smc"])
def test_fvd_and_smc_run_with_a_multistep_scheduler(sd, method, name):
    pipe = with_scheduler(sd, name)
    out = aligned(pipe, 4, method=method)
    assert torch.isfinite(out.result.samples).all()
    assert out.result.config["transition"] == TRANSITION[name]
    assert any(row.selected for row in out.result.trace)


def test_a_user_transition_wins_over_the_schedulers(sd):
    pipe = with_scheduler(sd, "DPMSolverMultistepScheduler")
    out = aligned(pipe, 4, transition="ddim", eta=0.0)
    assert out.result.config.get("transition", "ddim") == "ddim"
    assert not torch.allclose(out.result.samples, pipe_latents(pipe, 4), atol=1e-3)


@pytest.mark.parametrize("name, options, needle", [
    ("LMSDiscreteScheduler", {}, "LMSDiscreteScheduler is not stepped natively"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "disable_corrector": [0]},
     "solver_type='bh1'; disable_corrector=\\[0\\]"),
    ("UniPCMultistepScheduler", {"solver_order": 3}, "solver_order=3"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order=3"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
     "final_sigmas_type='sigma_min'; algorithm_type='dpmsolver'"),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, "fall between training steps"),
])
def test_what_is_not_covered_is_replaced_with_a_warning_naming_it(sd, name, options, needle):
    pipe = with_scheduler(sd, name, **options)
    with pytest.warns(SchedulerReplacedWarning, match=needle):  # 5 linspace steps: 249.75, ... not whole steps
        align(pipe, PROMPT, Brightness(), method="base", num_images_per_prompt=N, num_inference_steps=5,
              guidance_scale=2.0, output_type="latent")
