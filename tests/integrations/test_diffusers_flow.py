"""SD3 and FLUX (flow-matching) pipelines as engine Denoisers, on tiny random real diffusers components (offline).

The golden test: method="base" with η = 0 on the pipeline's own FlowMatchEulerDiscreteScheduler timesteps
reproduces ``pipe(prompt, latents=..., output_type="latent")``. The two are the same update in exact
arithmetic (DDIM(0) in the VP view is the Euler step x_s = x_t + (s − t) v, see
tests/samplers/test_flow_matching.py); in float32 they differ by rounding only. Measured: ≤ 5.3e-6 (SD3)
and ≤ 1.9e-6 (FLUX) for latents of size ≤ 5 at 1 to 28 steps, where the pipeline's own float32 run differs
from its float64 run by ~1e-6 (the VP view adds ~6 roundings per step: x̃ = x_t / c(t), x_t = c(t) x̃ and
the DDIM coefficients). ATOL = 1e-4 is 20x that, and 14x below the smallest planted error: transformer
timesteps off by 0.1% (sigma * 999) move the latents by >= 1.4e-3; swapped CFG halves by >= 0.4; a table
without the scheduler's shift by >= 0.013.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
import tiny_flow_pipelines as tiny  # noqa: E402
from tiny_flow_pipelines import flux, sd3  # noqa: E402,F401  (module fixtures)
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

import fvdiffusion as fv  # noqa: E402
from fvdiffusion.denoisers import Denoiser  # noqa: E402
from fvdiffusion.errors import SchedulerReplacedWarning, UnsupportedPipelineError  # noqa: E402
from fvdiffusion.integrations.diffusers import LatentImageReward  # noqa: E402
from fvdiffusion.integrations.diffusers.flow import (  # noqa: E402
    FluxDenoiser, SD3Denoiser, flow_denoiser_for, flow_times_from_scheduler, is_flow_pipeline,
)
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

PROMPT = "a red cat on the mat"
ATOL = 1e-4
TOKENS = {"max_sequence_length": tiny.T5_TOKENS}


_latents = tiny.unpacked_latents


def _engine_base(den, latents, prompt=PROMPT):
    k = den.num_inference_steps
    return fv.sample("base", den, None, n_particles=latents.shape[0], num_steps=k, eta=0.0, grid=den.grid,
                     x_init=den.initial_state(latents), cond=prompt).samples


# ---------------------------------------------------------------- SD3


def test_sd3_denoiser_reads_the_pipeline_and_leaves_its_scheduler_alone(sd3):
    before = sd3.scheduler.timesteps.clone()
    den = SD3Denoiser(sd3, PROMPT, num_inference_steps=4, **TOKENS)
    assert den.sample_shape == (4, 8, 8) and den.prediction_type == "v" and isinstance(den, Denoiser)
    expected = type(sd3.scheduler).from_config(sd3.scheduler.config)
    expected.set_timesteps(4)
    assert torch.equal(den.flow_times.float(), expected.sigmas[:-1].flip(0))  # shift 3 included, bit for bit
    assert [s.t for s in den.grid] == [3, 2, 1, 0] and den.grid[-1].t_prev == -1
    assert torch.equal(sd3.scheduler.timesteps, before)


def test_sd3_velocity_is_the_transformer_with_classifier_free_guidance(sd3):
    den = SD3Denoiser(sd3, PROMPT, guidance_scale=3.0, num_inference_steps=4, **TOKENS)
    x, t = _latents(2, 1), torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = sd3.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True, **TOKENS)
        ts = t.float() * 1000

        def v(embeds, pool):
            return sd3.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=embeds.expand(2, -1, -1),
                                   pooled_projections=pool.expand(2, -1), return_dict=False)[0]

        text, uncond = v(pos, pooled), v(neg, neg_pooled)
    torch.testing.assert_close(den.velocity_fn(x, t, PROMPT), uncond + 3.0 * (text - uncond), rtol=1e-5, atol=1e-6)
    no_cfg = SD3Denoiser(sd3, PROMPT, guidance_scale=1.0, num_inference_steps=4, **TOKENS)
    torch.testing.assert_close(no_cfg.velocity_fn(x, t, None), text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sd3_base_eta0_reproduces_the_pipeline(sd3, steps, guidance):
    den = SD3Denoiser(sd3, PROMPT, guidance_scale=guidance, num_inference_steps=steps, **TOKENS)
    latents = _latents(3, steps)
    expected = sd3(PROMPT, latents=latents, num_images_per_prompt=3, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="latent", **TOKENS).images
    torch.testing.assert_close(_engine_base(den, latents), expected, rtol=0, atol=ATOL)


def test_sd3_negative_prompt_and_dynamic_shift_follow_the_pipeline():
    pipe = tiny.sd3_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    den = SD3Denoiser(pipe, PROMPT, negative_prompt="blurry", guidance_scale=3.0, num_inference_steps=4, **TOKENS)
    latents = _latents(2, 7)
    expected = pipe(PROMPT, negative_prompt="blurry", latents=latents, num_images_per_prompt=2,
                    num_inference_steps=4, guidance_scale=3.0, output_type="latent", **TOKENS).images
    torch.testing.assert_close(_engine_base(den, latents), expected, rtol=0, atol=ATOL)


def test_sd3_fvd_runs_end_to_end_and_is_deterministic(sd3):
    den = SD3Denoiser(sd3, PROMPT, guidance_scale=2.0, num_inference_steps=4, **TOKENS)
    reward = LatentImageReward(sd3, Brightness())
    runs = [fv.sample("fvd", den, reward, n_particles=4, num_steps=4, grid=den.grid, seed=3, cond=PROMPT)
            for _ in range(2)]
    assert runs[0].samples.shape == (4, 4, 8, 8) and bool(torch.isfinite(runs[0].samples).all())
    assert torch.equal(runs[0].samples, runs[1].samples) and torch.equal(runs[0].rewards, runs[1].rewards)
    assert runs[0].cost.denoiser_calls == 16
    assert reward.decode(runs[0].samples).shape == (4, 3, 16, 16)
    batched = SD3Denoiser(sd3, PROMPT, guidance_scale=2.0, num_inference_steps=4, batch_size=1, **TOKENS)
    again = fv.sample("fvd", batched, reward, n_particles=4, num_steps=4, grid=batched.grid, seed=3, cond=PROMPT)
    torch.testing.assert_close(again.samples, runs[0].samples, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- FLUX


def test_flux_denoiser_packs_latents_and_embeds_guidance(flux):
    den = FluxDenoiser(flux, PROMPT, guidance_scale=3.5, num_inference_steps=4, height=16, width=16, **TOKENS)
    assert den.sample_shape == (4, 8, 8) and den.prediction_type == "v"
    x, t = _latents(2, 2), torch.tensor([0.8, 0.2], dtype=torch.float64)
    with torch.no_grad():
        embeds, pooled, text_ids = flux.encode_prompt(PROMPT, None, **TOKENS)
        image_ids = flux._prepare_latent_image_ids(1, 4, 4, "cpu", embeds.dtype)
        out = flux.transformer(hidden_states=flux._pack_latents(x, 2, 4, 8, 8), timestep=t.float() * 1000 / 1000,
                               guidance=torch.full((2,), 3.5), pooled_projections=pooled.expand(2, -1),
                               encoder_hidden_states=embeds.expand(2, -1, -1), txt_ids=text_ids, img_ids=image_ids,
                               return_dict=False)[0]
    expected = flux._unpack_latents(out, 16, 16, flux.vae_scale_factor)
    torch.testing.assert_close(den.velocity_fn(x, t, None), expected, rtol=1e-5, atol=1e-6)


def _flux_pipe_latents(flux, latents, steps, **kwargs):
    n = latents.shape[0]
    packed = flux(PROMPT, latents=flux._pack_latents(latents, n, 4, 8, 8), num_images_per_prompt=n,
                  num_inference_steps=steps, output_type="latent", height=16, width=16, **TOKENS, **kwargs).images
    return flux._unpack_latents(packed, 16, 16, flux.vae_scale_factor)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_base_eta0_reproduces_the_pipeline(flux, steps):
    den = FluxDenoiser(flux, PROMPT, guidance_scale=3.5, num_inference_steps=steps, height=16, width=16, **TOKENS)
    latents = _latents(3, steps)
    expected = _flux_pipe_latents(flux, latents, steps, guidance_scale=3.5)
    torch.testing.assert_close(_engine_base(den, latents), expected, rtol=0, atol=ATOL)


def test_flux_true_cfg_reproduces_the_pipeline(flux):
    den = FluxDenoiser(flux, PROMPT, negative_prompt="blurry", true_cfg_scale=2.0, guidance_scale=3.5,
                       num_inference_steps=4, height=16, width=16, **TOKENS)
    latents = _latents(2, 9)
    expected = _flux_pipe_latents(flux, latents, 4, guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0)
    torch.testing.assert_close(_engine_base(den, latents), expected, rtol=0, atol=ATOL)


def test_flux_fvd_runs_end_to_end_and_is_deterministic(flux):
    den = FluxDenoiser(flux, PROMPT, num_inference_steps=4, height=16, width=16, **TOKENS)
    reward = LatentImageReward(flux, Brightness())
    runs = [fv.sample("fvd", den, reward, n_particles=4, num_steps=4, grid=den.grid, seed=5, cond=PROMPT)
            for _ in range(2)]
    assert runs[0].samples.shape == (4, 4, 8, 8) and bool(torch.isfinite(runs[0].rewards).all())
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert reward.decode(runs[0].samples).shape == (4, 3, 16, 16)


# ---------------------------------------------------------------- what is refused, and how


def test_img2img_and_other_pipelines_are_refused_by_name(sd3, flux):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    for pipe, cls in [(sd3, StableDiffusion3Img2ImgPipeline), (flux, FluxImg2ImgPipeline)]:
        other = cls(**pipe.components)
        assert is_flow_pipeline(other)
        with pytest.raises(UnsupportedPipelineError, match=f"{cls.__name__} is not supported.*dropped") as info:
            flow_denoiser_for(other, PROMPT)
        assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedPipelineError, match="FluxPipeline is not supported by SD3Denoiser"):
        SD3Denoiser(flux, PROMPT)
    sd = tiny_diffusers.sd_pipeline()
    assert not is_flow_pipeline(sd)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline is not supported"):
        flow_denoiser_for(sd, PROMPT)


def test_schedulers_that_are_not_euler_flow_matching_are_refused_or_named():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    with pytest.raises(UnsupportedPipelineError, match="repeats or reorders sigmas"):
        flow_times_from_scheduler(FlowMatchHeunDiscreteScheduler(), 4)
    with pytest.raises(TypeError, match="flow-matching scheduler"):
        flow_times_from_scheduler(object(), 4)
    with pytest.raises((UnsupportedPipelineError, ValueError, TypeError)):
        flow_times_from_scheduler(DDIMScheduler(), 4)
    with pytest.raises(UnsupportedPipelineError, match="invert_sigmas"):
        flow_times_from_scheduler(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 4)
    pipe = tiny.sd3_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SD3Denoiser(pipe, PROMPT, num_inference_steps=2, **TOKENS)
    assert any(issubclass(w.category, SchedulerReplacedWarning) and "stochastic_sampling=True) is replaced" in str(w.message)
               for w in caught)


def test_bad_arguments_fail_with_one_line(sd3, flux):
    for call, error, match in [
        (lambda: SD3Denoiser(sd3, PROMPT, height=18, **TOKENS), ValueError, "multiples of 4"),
        (lambda: FluxDenoiser(flux, PROMPT, height=18, width=16, **TOKENS), ValueError, "multiples of 4"),
        (lambda: SD3Denoiser(sd3, ["a", "b"], **TOKENS), TypeError, "prompt must be a string"),
        (lambda: SD3Denoiser(sd3, PROMPT, guidance_scale=-1, **TOKENS), ValueError, "guidance_scale"),
        (lambda: SD3Denoiser(sd3, PROMPT, num_inference_steps=0, **TOKENS), ValueError, "positive int"),
        (lambda: SD3Denoiser(sd3, PROMPT, batch_size=0, **TOKENS), ValueError, "batch_size"),
    ]:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    den = SD3Denoiser(sd3, PROMPT, num_inference_steps=2, **TOKENS)
    with pytest.raises(ValueError, match="differs from the prompt"):
        den(torch.zeros(1, 4, 8, 8), torch.tensor([1]), "another prompt")
