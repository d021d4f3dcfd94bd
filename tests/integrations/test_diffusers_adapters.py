"""Diffusers adapters on tiny, randomly initialised real diffusers components (offline)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

import fvdiffusion  # noqa: E402
from fvdiffusion.integrations.diffusers import (  # noqa: E402
    LatentImageReward, PixelImageReward, StableDiffusionDenoiser, UNet2DModelDenoiser, prediction_type_from_scheduler,
)
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

PROMPT = "a red cat on the mat"


@pytest.fixture(scope="module")
def ddpm():
    return tiny_diffusers.ddpm_pipeline()


@pytest.fixture(scope="module")
def sd():
    return tiny_diffusers.sd_pipeline()


def test_unet2d_denoiser_reads_the_scheduler_and_calls_the_unet(ddpm):
    den = UNet2DModelDenoiser(ddpm.unet, ddpm.scheduler)
    assert den.sample_shape == (3, 8, 8)
    assert den.prediction_type == "eps"
    torch.testing.assert_close(den.schedule.alphas_cumprod, ddpm.scheduler.alphas_cumprod.double())
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999, 500, 3])
    with torch.no_grad():
        expected = ddpm.unet(x, t).sample
    torch.testing.assert_close(den(x, t), expected)


def test_unet2d_denoiser_accepts_a_bare_alphas_cumprod_and_an_explicit_prediction_type(ddpm):
    den = UNet2DModelDenoiser(ddpm.unet, ddpm.scheduler.alphas_cumprod, prediction_type="v")
    assert den.prediction_type == "v"
    with pytest.raises(TypeError, match="alphas_cumprod"):
        UNet2DModelDenoiser(ddpm.unet, object())
    with pytest.raises(ValueError, match="prediction_type"):
        UNet2DModelDenoiser(ddpm.unet, ddpm.scheduler, prediction_type="epsilon")


def test_prediction_types_map_from_diffusers_names():
    from diffusers import DDIMScheduler, DDPMScheduler

    assert prediction_type_from_scheduler(DDPMScheduler(prediction_type="v_prediction")) == "v"
    assert prediction_type_from_scheduler(DDIMScheduler(prediction_type="sample")) == "x0"
    with pytest.raises(ValueError, match="flow_prediction"):
        prediction_type_from_scheduler(DDPMScheduler(prediction_type="flow_prediction"))


def test_sd_denoiser_shapes_and_classifier_free_guidance(sd):
    den = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=3.0)
    assert den.sample_shape == (4, 8, 8) and den.prediction_type == "eps"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([900, 100])
    with torch.no_grad():
        text, uncond = sd.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)
        e_text = sd.unet(x, t, encoder_hidden_states=text.expand(2, -1, -1)).sample
        e_uncond = sd.unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    torch.testing.assert_close(den(x, t, PROMPT), e_uncond + 3.0 * (e_text - e_uncond), rtol=1e-4, atol=1e-5)
    no_cfg = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=1.0)
    torch.testing.assert_close(no_cfg(x, t), e_text, rtol=1e-4, atol=1e-5)


def test_sd_denoiser_micro_batching_keeps_outputs(sd):
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.full((5,), 500)
    whole = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=2.0)(x, t)
    chunked = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=2.0, batch_size=2)(x, t)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_sd_denoiser_rejects_a_different_prompt_as_cond(sd):
    den = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=2.0)
    with pytest.raises(ValueError, match="differs from the prompt"):
        den(torch.zeros(1, 4, 8, 8), torch.tensor([10]), "another prompt")


def test_v_prediction_comes_from_the_pipeline_scheduler():
    pipe = tiny_diffusers.sd_pipeline(prediction_type="v_prediction")
    den = StableDiffusionDenoiser(pipe, PROMPT, guidance_scale=2.0)
    assert den.prediction_type == "v"
    result = fvdiffusion.sample(method="fvd", denoiser=den, reward=LatentImageReward(pipe, Brightness()),
                                n_particles=4, num_steps=3, seed=0, cond=PROMPT)
    assert result.samples.shape == (4, 4, 8, 8) and torch.isfinite(result.samples).all()


def test_sdxl_added_conditioning_runs_through_the_engine():
    pipe = tiny_diffusers.sdxl_pipeline()
    den = StableDiffusionDenoiser(pipe, PROMPT, guidance_scale=2.0)
    assert set(den.added_cond) == {"text_embeds", "time_ids"}
    assert den.added_cond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    result = fvdiffusion.sample(method="fvd", denoiser=den, reward=LatentImageReward(pipe, Brightness()),
                                n_particles=4, num_steps=3, seed=0, cond=PROMPT)
    assert result.samples.shape == (4, 4, 8, 8) and torch.isfinite(result.rewards).all()


def test_latent_reward_decodes_with_the_scaling_factor_and_counts(sd):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    rew = LatentImageReward(sd, Brightness())
    images = rew.decode(z)
    with torch.no_grad():
        expected = (sd.vae.decode(z / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(rew(z), expected.mean(dim=(1, 2, 3)))
    assert rew.decodes == 6


def test_fp16_vae_with_force_upcast_decodes_in_fp32_and_stays_fp16():
    pipe = tiny_diffusers.sd_pipeline()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    reference = LatentImageReward(pipe, Brightness()).decode(z)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    images = LatentImageReward(pipe, Brightness()).decode(z)
    assert images.dtype == torch.float32 and pipe.vae.dtype == torch.float16
    torch.testing.assert_close(images, reference, rtol=0, atol=2e-3)  # only the fp16 rounding of the weights


def test_latent_reward_batched_and_one_by_one_agree_in_order(sd):
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    batched = LatentImageReward(sd, Brightness(), batch_size=2)
    single = LatentImageReward(sd, Brightness())
    together = batched(z)
    one_by_one = torch.cat([single(z[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    assert together.unique().numel() == 5  # distinct values, so a permutation would be caught
    assert batched.decodes == single.decodes == 5


def test_pixel_reward_maps_minus_one_one_to_unit_range():
    rew = PixelImageReward(Brightness(), batch_size=1)
    x = torch.stack([torch.full((3, 4, 4), -1.0), torch.zeros(3, 4, 4), torch.full((3, 4, 4), 3.0)])
    torch.testing.assert_close(rew(x), torch.tensor([0.0, 0.5, 1.0]))


def test_every_engine_method_runs_on_the_sd_adapters(sd):
    den = StableDiffusionDenoiser(sd, PROMPT, guidance_scale=2.0)
    for method in fvdiffusion.METHODS:
        rew = LatentImageReward(sd, Brightness())
        result = fvdiffusion.sample(method=method, denoiser=den, reward=rew, n_particles=4, num_steps=3, seed=0,
                                    cond=PROMPT)
        assert result.samples.shape == (4, 4, 8, 8), method
        assert result.rewards.shape == (4,) and torch.isfinite(result.rewards).all(), method
        assert rew.decodes == result.cost.reward_calls, method
