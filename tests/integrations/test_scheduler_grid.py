"""align() takes its step grid from the pipeline's scheduler and, with DDIM at eta = 0, reproduces diffusers.

Golden: ``method="base"``, ``eta=0`` and a ``DDIMScheduler`` give the latents of
``pipe(prompt, generator=...)`` / ``pipe(prompt, latents=...)`` (tiny SD pipeline) and of
``DDIMPipeline`` (tiny UNet2DModel) to float tolerance, at 1, 4 and 50 steps, with "leading"
and "trailing" spacing. Other schedulers give their timesteps and one SchedulerReplacedWarning.
"""

import copy
import sys
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
from fvdiffusion.integrations.diffusers.timesteps import ddim_timesteps, scheduler_grid  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402
from fvdiffusion.schedule import StepGrid, VPSchedule  # noqa: E402

PROMPT = "a photo of the sea"
N = 2
STEPS = [1, 4, 50]
SPACINGS = ["leading", "trailing"]


def with_scheduler(pipe, scheduler):
    out = copy.copy(pipe)  # the same modules, another scheduler
    out.scheduler = scheduler
    return out


@pytest.fixture(scope="module")
def sd_v():
    pipe = tiny_diffusers.sd_pipeline("v_prediction")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ddpm():
    return tiny_diffusers.ddpm_pipeline()


def sd_with_spacing(sd, spacing):
    # the tiny SD scheduler: scaled_linear, steps_offset=1, set_alpha_to_one=False (SD 1.x's DDIM config)
    return with_scheduler(sd, type(sd.scheduler).from_config(sd.scheduler.config, timestep_spacing=spacing))


def ddim_pipeline(ddpm, spacing):
    """diffusers' DDIMPipeline on the tiny UNet2DModel (default DDIM config: set_alpha_to_one=True, steps_offset=0)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler(clip_sample=False, timestep_spacing=spacing))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def aligned(pipe, prompt, **kwargs):
    options = dict(method="base", eta=0.0, num_images_per_prompt=N, output_type="latent")
    if prompt is not None:
        options["guidance_scale"] = 2.0
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SchedulerReplacedWarning)  # DDIM is the engine's own step: no warning
        return align(pipe, prompt, Brightness(), **options)


# ---------------------------------------------------------------- golden: diffusers' own loop

@pytest.mark.parametrize("spacing", [*SPACINGS, "linspace"])  # linspace: DDIM lands on t − T//K, not the next step
@pytest.mark.parametrize("steps", STEPS)
def test_base_ddim_eta0_reproduces_the_sd_pipeline_from_its_generator(sd, spacing, steps):
    pipe = sd_with_spacing(sd, spacing)
    expected = pipe(PROMPT, num_inference_steps=steps, guidance_scale=2.0, num_images_per_prompt=N,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    out = aligned(pipe, PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.images, expected[out.ranking])  # output_type="latent": ranked latents


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_base_ddim_eta0_reproduces_the_sd_pipeline_from_given_latents(sd, spacing, steps):
    pipe = sd_with_spacing(sd, spacing)
    latents = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = pipe(PROMPT, num_inference_steps=steps, guidance_scale=2.0, num_images_per_prompt=N,
                    latents=latents.clone(), negative_prompt="blurry", output_type="latent").images
    out = aligned(pipe, PROMPT, num_inference_steps=steps, latents=latents, negative_prompt="blurry")
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-4)


def spy_on_steps(pipe):
    """Record every prev_sample the pipeline's scheduler returns (DDIMPipeline clamps its output to [0, 1])."""
    seen = []
    step = pipe.scheduler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.prev_sample.clone())
        return out

    pipe.scheduler.step = recording
    return seen


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_base_ddim_eta0_reproduces_ddim_pipeline_on_a_unet2dmodel(ddpm, spacing, steps):
    pipe = ddim_pipeline(ddpm, spacing)
    seen = spy_on_steps(pipe)
    images = pipe(batch_size=N, generator=torch.Generator().manual_seed(7), eta=0.0, num_inference_steps=steps,
                  output_type="pt").images
    expected = seen[-1]
    del pipe.scheduler.step  # back to the class's method
    out = aligned(pipe, None, num_inference_steps=steps, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-4)
    pt = aligned(pipe, None, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="pt")
    torch.testing.assert_close(pt.images, images[pt.ranking], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the grid is the scheduler's

@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_the_steps_run_at_the_timesteps_the_scheduler_chose(sd, spacing, offset, steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing=spacing, steps_offset=offset)
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    seen = []
    out = aligned(with_scheduler(sd, scheduler), PROMPT, num_inference_steps=steps,
                  callback_on_step_end=lambda pipe, i, t, kw: seen.append(t))
    assert [row.t for row in out.result.trace] == probe.timesteps.tolist() == seen
    assert ddim_timesteps(1000, steps, spacing, offset) == probe.timesteps.tolist()
    assert scheduler.num_inference_steps is None  # the user's scheduler is left as it was


@pytest.mark.parametrize("spacing, first", [("leading", 1), ("trailing", 999)])
def test_one_step_starts_at_the_schedulers_first_timestep(sd, spacing, first):
    # diffusers' DDIM: 1 "leading" step (steps_offset=1) runs at t = 1, 1 "trailing" step at t = 999
    out = aligned(sd_with_spacing(sd, spacing), PROMPT, num_inference_steps=1)
    assert [row.t for row in out.result.trace] == [first]


def test_ddim_lands_where_diffusers_lands():
    # DDIM steps from t to t − T // K whatever comes next on the grid, and ends on final_alpha_cumprod
    from diffusers import DDIMScheduler

    for set_alpha_to_one, end in ((False, 0), (True, -1)):
        scheduler = DDIMScheduler(timestep_spacing="linspace", set_alpha_to_one=set_alpha_to_one)
        schedule = schedule_from_scheduler(scheduler)
        grid = scheduler_grid(scheduler, 3, schedule).grid
        assert [(s.t, s.t_prev) for s in grid] == [(999, 666), (500, 167), (0, end)]
        final = float(scheduler.final_alpha_cumprod)
        assert grid[-1].alpha_bar_prev == pytest.approx(final, rel=1e-7)
    # DDPM steps to the next timestep and ends on clean data
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(timestep_spacing="linspace", clip_sample=False)
    grid = scheduler_grid(ddpm, 3, schedule_from_scheduler(ddpm)).grid
    assert [(s.t, s.t_prev) for s in grid] == [(999, 500), (500, 0), (0, -1)] and grid[-1].alpha_bar_prev == 1.0


def test_step_grid_from_landings_checks_its_input():
    schedule = VPSchedule.linear(10)
    grid = StepGrid.from_landings(schedule, [9, 5], [6, 0])
    assert [(s.k, s.index, s.t, s.t_prev) for s in grid] == [(2, 0, 9, 6), (1, 1, 5, 0)]
    assert grid[0].alpha_bar_prev == schedule.alpha_bar(6).item() and grid[1].alpha_bar == schedule.alpha_bar(5).item()
    with pytest.raises(ValueError, match="as many landings"):
        StepGrid.from_landings(schedule, [9, 5], [6])
    assert StepGrid.from_landings(schedule, [0], [0])[0].alpha_bar_prev == schedule.alpha_bar(0).item()  # DDIM's last
    with pytest.raises(ValueError, match="landing on 6"):
        StepGrid.from_landings(schedule, [5], [6])
    with pytest.raises(ValueError, match="t=10"):
        StepGrid.from_landings(schedule, [10], [-1])


# ---------------------------------------------------------------- zero terminal SNR

def test_a_zero_terminal_snr_scheduler_runs(sd_v):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd_v.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    schedule = schedule_from_scheduler(scheduler)
    assert schedule.alphas_cumprod[-1].item() == 2.0**-24  # clamped as diffusers' Euler schedulers clamp it
    assert torch.equal(schedule.alphas_cumprod[:-1], scheduler.alphas_cumprod[:-1].double())
    pipe = with_scheduler(sd_v, scheduler)
    out = aligned(pipe, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.result.trace[0].t == 999 and torch.isfinite(out.result.samples).all()
    # v-prediction DDIM is finite at ᾱ = 0 in diffusers: the clamp changes x0 by √(2**-24) x_T at the first step
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=2.0, num_images_per_prompt=N,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(out.result.samples, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


# ---------------------------------------------------------------- replaced schedulers

REPLACED = {  # class -> extra config; all from the tiny SD pipeline's DDIM config (native ones: test_native_schedulers)
    "UniPCMultistepScheduler": {"solver_type": "bh1"}, "PNDMScheduler": {"skip_prk_steps": True},
    "LMSDiscreteScheduler": {},
    "HeunDiscreteScheduler": {}, "LCMScheduler": {}, "TCDScheduler": {}, "KDPM2DiscreteScheduler": {},
}


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_other_schedulers_give_their_timesteps_and_one_warning_naming_them(sd, name):
    import diffusers

    scheduler = getattr(diffusers, name).from_config(sd.scheduler.config, **REPLACED[name])
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(4)
    chosen = [int(round(float(t))) for t in probe.timesteps]
    with pytest.warns(SchedulerReplacedWarning) as record:
        out = align(with_scheduler(sd, scheduler), PROMPT, Brightness(), method="base", num_images_per_prompt=N,
                    num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    replaced = [w for w in record if issubclass(w.category, SchedulerReplacedWarning)]
    assert len(replaced) == 1
    message = str(replaced[0].message)
    assert f"replaces {name}'s stepping" in message and "wrong particle after selection" in message
    steps = [row.t for row in out.result.trace]
    assert len(steps) == 4 and steps[0] == chosen[0]
    distinct = list(dict.fromkeys(chosen))  # Heun / PNDM visit a timestep twice
    if len(distinct) == 4:
        assert steps == distinct
    else:  # KDPM2: 7 timesteps for 4 steps, interpolated ones among them
        assert "not 4 distinct training steps" in message and steps == ddim_timesteps(1000, 4, "linspace")


@pytest.mark.parametrize("options, needle", [(dict(variance_type="fixed_large"), "variance_type='fixed_large'")])
def test_ddpm_with_what_the_engine_does_not_apply_warns(sd, options, needle):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(sd.scheduler.config, **{"clip_sample": False, **options})
    with pytest.warns(SchedulerReplacedWarning, match=needle):
        align(with_scheduler(sd, scheduler), PROMPT, Brightness(), method="base", num_images_per_prompt=N,
              num_inference_steps=2, guidance_scale=2.0, output_type="latent")


@pytest.mark.parametrize("options, field", [
    (dict(clip_sample=True, clip_sample_range=0.5), "clip_x0"),
    (dict(thresholding=True, sample_max_value=1.2, dynamic_thresholding_ratio=0.9), "dynamic_threshold"),
])
def test_ddim_clipping_and_thresholding_are_applied_as_diffusers_applies_them(sd, options, field):
    """x̂0 processing is now the transition's: DDIM(0) with clip_sample / thresholding reproduces pipe(...)."""
    from diffusers import DDIMScheduler

    pipe = with_scheduler(sd, DDIMScheduler.from_config(sd.scheduler.config, **options))
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=2.0, num_images_per_prompt=N,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    out = aligned(pipe, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    assert out.result.config[field] is not None
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-4)
    plain = aligned(sd, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(plain.result.samples, out.result.samples, atol=1e-4)  # the option did something


def test_ddpm_with_clipping_steps_with_the_posterior_of_the_clipped_x0(sd):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(sd.scheduler.config, clip_sample=True)
    out = aligned(with_scheduler(sd, scheduler), PROMPT, num_inference_steps=4, eta=1.0)  # no warning
    assert out.result.config["transition"] == "ddpm" and out.result.config["clip_x0"] == 1.0
    with pytest.raises(Exception, match="eta"):  # the DDPM posterior has one noise level
        aligned(with_scheduler(sd, scheduler), PROMPT, num_inference_steps=4, eta=0.0)


def test_ddpm_without_clipping_is_the_engines_own_step(sd):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(sd.scheduler.config, clip_sample=False)
    out = aligned(with_scheduler(sd, scheduler), PROMPT, num_inference_steps=4, eta=1.0)  # no warning
    assert [row.t for row in out.result.trace] == [751, 501, 251, 1]


def test_set_timesteps_failures_and_bad_step_counts_are_one_line_errors(sd):
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\], got 1001"):
        aligned(sd, PROMPT, num_inference_steps=1001)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\], got 0"):
        aligned(sd, PROMPT, num_inference_steps=0)
    from diffusers import LCMScheduler

    lcm = LCMScheduler.from_config(sd.scheduler.config)  # at most original_inference_steps = 50 steps
    with pytest.raises(ValueError, match=r"LCMScheduler.set_timesteps\(60\) failed: ValueError") as info:
        align(with_scheduler(sd, lcm), PROMPT, Brightness(), num_inference_steps=60)
    assert "\n" not in str(info.value)
