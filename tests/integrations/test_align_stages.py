"""align() runs four stages: parse (align_call.parse_call) -> plan (align_plan.plan_call) -> sample
(align.sample_plan) -> output (align.build_output).

The plan of a tiny SD pipeline is checked without running its UNet or VAE: the grid its scheduler's
set_timesteps(K) chose, the scheduler's engine options under the user's, the adapters per prompt, and the
x_T and seeds drawn from the generator in the pipeline's order (x_T first, then one engine seed per prompt).
"""

import copy
import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)
from tiny_diffusers import sd  # noqa: E402,F401  (module fixture)
from tiny_diffusers import count_calls  # noqa: E402,F401  (fixture)

import diffusers  # noqa: E402

from fvdiffusion.config import SEED_MAX  # noqa: E402
from fvdiffusion.errors import DuplicateImagesWarning, SchedulerReplacedWarning  # noqa: E402
from fvdiffusion.integrations.diffusers import LatentImageReward, align  # noqa: E402
from fvdiffusion.integrations.diffusers.align_call import AlignCall, parse_call  # noqa: E402
from fvdiffusion.integrations.diffusers.align_plan import PLANNERS, AlignPlan, plan_call  # noqa: E402
from fvdiffusion.integrations.diffusers.pipelines import SUPPORTED_PIPELINES  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

align_module = sys.modules["fvdiffusion.integrations.diffusers.align"]
PROMPTS = ["a photo of the sea", "a red bicycle"]


def parsed(pipe, prompt, **kwargs) -> AlignCall:
    """parse_call as align() calls it: align()'s defaults for every argument not given, the rest method options."""
    defaults = {name: p.default for name, p in inspect.signature(align).parameters.items() if p.kind is p.KEYWORD_ONLY}
    options = {key: kwargs.pop(key) for key in list(kwargs) if key not in defaults}
    return parse_call(pipe, prompt, Brightness(), **{**defaults, **kwargs}, method_options=options)


def with_scheduler(pipe, name):
    out = copy.copy(pipe)  # the same modules, another scheduler
    out.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    return out


def test_align_calls_parse_plan_sample_output_in_order(sd, monkeypatch):
    """The four stages in order; prompt i's result is output (decoded) before prompt i + 1 samples."""
    events = []

    def spy(name, label):
        real = getattr(align_module, name)

        def wrapper(*args, **kwargs):
            events.append(label(args, kwargs) if callable(label) else label)
            return real(*args, **kwargs)

        monkeypatch.setattr(align_module, name, wrapper)

    spy("parse_call", "parse")
    spy("plan_call", "plan")
    spy("sample_plan", "sample")
    spy("build_output", "output")
    spy("sample", lambda args, kwargs: f"engine {kwargs['cond']}")
    spy("_output", lambda args, kwargs: f"images {args[1]}")
    out = align(sd, PROMPTS, Brightness(), n_particles=2, num_inference_steps=2, guidance_scale=2.0, seed=0,
                output_type="pt")
    assert events == ["parse", "plan", "sample", "output", f"engine {PROMPTS[0]}", f"images {PROMPTS[0]}",
                      f"engine {PROMPTS[1]}", f"images {PROMPTS[1]}"]
    assert [r.prompt for r in out] == PROMPTS and all(r.images.shape == (2, 3, 16, 16) for r in out)


def test_parse_call_takes_every_argument_of_align():
    """parse_call names align()'s arguments, the method options as one dict."""
    def names(fn):
        return [(name, p.kind) for name, p in inspect.signature(fn).parameters.items()]

    expected = [(n, k) if k is not inspect.Parameter.VAR_KEYWORD else (n, inspect.Parameter.KEYWORD_ONLY)
                for n, k in names(align)]
    assert names(parse_call) == expected


def test_every_supported_pipeline_kind_has_a_planner():
    assert set(PLANNERS) == set(SUPPORTED_PIPELINES.values())


def test_plan_of_a_tiny_sd_pipeline_without_running_the_model(sd, count_calls):
    pipe = with_scheduler(sd, "DPMSolverMultistepScheduler")
    runs = count_calls(pipe.unet, pipe.vae)
    call = parsed(pipe, PROMPTS, method="fvd", num_images_per_prompt=3, num_inference_steps=4, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(7), eta=0.5)
    assert (call.kind, call.prompts, call.single, call.n, call.guidance) == ("t2i", PROMPTS, False, 3, 2.0)
    plan = plan_call(pipe, call)
    assert isinstance(plan, AlignPlan) and runs == []
    # the grid: the timesteps the scheduler's set_timesteps(K) chose, for every prompt
    pipe.scheduler.set_timesteps(4)
    assert plan.steps.scheduler == "DPMSolverMultistepScheduler" and plan.num_steps == 4
    assert [s.t for s in plan.steps.grid] == [int(t) for t in pipe.scheduler.timesteps]
    assert plan.grids == [plan.steps.grid] * 2
    # the scheduler's engine options (its transition, eta 0) under the user's (eta 0.5 wins)
    assert dict(plan.steps.engine_options) == {"transition": "dpmpp_2m", "eta": 0.0}
    assert plan.method_options == {"transition": "dpmpp_2m", "eta": 0.5}
    assert (plan.config.transition, plan.config.eta, plan.config.n_particles) == ("dpmpp_2m", 0.5, 3)
    # the adapters per prompt; fvd calls the reward at every selection step, so it keeps no images
    assert [denoiser.prompt for denoiser, _ in plan.adapters] == PROMPTS
    assert all(isinstance(r, LatentImageReward) and not r.keep_last for _, r in plan.adapters)
    # x_T: one randn batch for every prompt as diffusers draws it, then one engine seed per prompt
    draws = torch.Generator().manual_seed(7)
    x_t = torch.randn((6, 4, 8, 8), generator=draws, dtype=torch.float32)
    assert [tuple(x.shape) for x in plan.x_inits] == [(3, 4, 8, 8)] * 2
    assert torch.equal(torch.cat(plan.x_inits), x_t * plan.steps.latent_scale)
    assert plan.seeds == torch.randint(0, SEED_MAX, (2,), generator=draws).tolist()


def test_plan_with_a_seed_leaves_x_t_to_the_engine(sd, count_calls):
    runs = count_calls(sd.unet, sd.vae)
    plan = plan_call(sd, parsed(sd, PROMPTS[0], method="base", n_particles=2, num_inference_steps=3, seed=5))
    assert runs == [] and plan.x_inits == [None] and plan.seeds == [5]
    assert plan.method_options == {} and plan.num_steps == 3 and len(plan.grids[0]) == 3
    assert plan.adapters[0][1].keep_last  # base: its one reward call is on the images it returns


def test_img2img_plan_runs_the_truncated_grid_from_the_noised_init_latent(sd, count_calls):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    runs = count_calls(pipe.unet, pipe.vae.decoder)
    image = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(1))
    plan = plan_call(pipe, parsed(pipe, PROMPTS[0], n_particles=2, num_inference_steps=4, strength=0.5, image=image,
                                  seed=3))
    assert runs == [] and plan.num_steps == 2 and len(plan.steps.grid) == 4
    assert [s.t for s in plan.grids[0]] == [s.t for s in plan.steps.grid][2:]
    assert plan.x_inits[0].shape == (2, 4, 12, 8)  # the init image's size, in latents
    assert plan.seeds == [3]


def test_the_stages_warnings_name_the_line_that_called_align(sd):
    """SchedulerReplacedWarning (plan) and DuplicateImagesWarning (output) point at align()'s caller."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        align(with_scheduler(sd, "LMSDiscreteScheduler"), PROMPTS[0], Brightness(), n_particles=2,
              num_inference_steps=2, seed=0, output_type="latent")
        align(sd, PROMPTS[0], Brightness(), method="fvd", n_particles=8, num_inference_steps=4, lam=100.0, eta=0.0,
              rebirth_noise=0.0, seed=0, output_type="latent")
    for category in (SchedulerReplacedWarning, DuplicateImagesWarning):
        found = [w for w in caught if issubclass(w.category, category)]
        assert len(found) == 1 and found[0].filename == __file__, (category, [(w.filename, w.lineno) for w in found])
