"""align() on flow-matching pipelines (tiny SD3 and FLUX built from the real diffusers classes)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_flow_pipelines as tiny  # noqa: E402
from tiny_flow_pipelines import flux, sd3  # noqa: E402,F401  (module fixtures)
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

from fvdiffusion.errors import UnsupportedPipelineError  # noqa: E402
from fvdiffusion.integrations.diffusers import align, build_adapters  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

PROMPT = "a red cat on the mat"
TOKENS = {"max_sequence_length": tiny.T5_TOKENS}


_latents = tiny.unpacked_latents


@pytest.mark.parametrize("steps", [1, 4])
def test_align_base_eta0_reproduces_sd3(sd3, steps):
    latents = _latents(3, 5)
    expected = sd3(PROMPT, latents=latents, num_images_per_prompt=3, num_inference_steps=steps, guidance_scale=3.0,
                   output_type="latent", **TOKENS).images
    out = align(sd3, PROMPT, Brightness(), method="base", eta=0.0, num_inference_steps=steps, guidance_scale=3.0,
                latents=latents, num_images_per_prompt=3, output_type="latent", **TOKENS)
    torch.testing.assert_close(out.result.samples, expected, rtol=0, atol=1e-4)
    assert out.result.cost.denoiser_calls == 3 * steps


@pytest.mark.parametrize("packed", [False, True])
def test_align_base_eta0_reproduces_flux_from_its_generator_or_latents(flux, packed):
    size = dict(height=16, width=16)
    expected = flux(PROMPT, generator=torch.Generator().manual_seed(4), num_images_per_prompt=2, num_inference_steps=4,
                    output_type="latent", **size, **TOKENS).images
    unpacked_expected = flux._unpack_latents(expected, 16, 16, flux.vae_scale_factor)
    if packed:
        start = flux._pack_latents(_latents(2, 6), 2, 4, 8, 8)
        expected = flux(PROMPT, latents=start, num_images_per_prompt=2, num_inference_steps=4, output_type="latent",
                        **size, **TOKENS).images
        unpacked_expected = flux._unpack_latents(expected, 16, 16, flux.vae_scale_factor)
        out = align(flux, PROMPT, Brightness(), method="base", eta=0.0, num_inference_steps=4, latents=start,
                    num_images_per_prompt=2, output_type="latent", **size, **TOKENS)
    else:
        out = align(flux, PROMPT, Brightness(), method="base", eta=0.0, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(4), num_images_per_prompt=2, output_type="latent",
                    **size, **TOKENS)
    torch.testing.assert_close(out.result.samples, unpacked_expected, rtol=0, atol=1e-4)


def test_align_fvd_on_sd3_ranks_decoded_images(sd3):
    out = align(sd3, PROMPT, Brightness(), method="fvd", num_inference_steps=4, num_images_per_prompt=4, seed=1,
                output_type="pt", **TOKENS)
    assert out.images.shape == (4, 3, 16, 16)
    assert torch.all(out.rewards[:-1] >= out.rewards[1:])
    generator = torch.Generator().manual_seed(0)
    again = [align(sd3, PROMPT, Brightness(), num_inference_steps=4, num_images_per_prompt=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **TOKENS).result.samples for _ in range(2)]
    assert torch.equal(again[0], again[1]) and generator is not None


def test_flow_pipelines_refuse_what_they_do_not_take(sd3):
    with pytest.raises(UnsupportedPipelineError, match="flow-matching"):
        build_adapters(sd3, PROMPT, Brightness())
    import tiny_diffusers

    with pytest.raises(ValueError, match="max_sequence_length"):
        align(tiny_diffusers.sd_pipeline(), PROMPT, Brightness(), num_inference_steps=2, max_sequence_length=8)
