"""Which pipelines align() drives: an allow-list by class name; every other class refused up front.

A refused pipeline gets one UnsupportedPipelineError line that names its class, says why (its
image / mask / control input would be dropped, it is a VP transformer or a multi-stage pipeline)
and lists what is supported, and nothing of it runs. SDXL base is supported: its added time ids
and pooled embeddings reproduce the pipeline's own latents (DDIM, eta = 0, method "base"), and so
does SD img2img, started from the noised init latent at ``strength``, and SD ControlNet (one ControlNetModel),
its control image passed to the ControlNet at every UNet call.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)
from tiny_diffusers import sd  # noqa: E402,F401  (module fixture)
from tiny_diffusers import count_calls  # noqa: E402,F401  (fixture)

import diffusers  # noqa: E402

from fvdiffusion.errors import UnsupportedPipelineError  # noqa: E402
from fvdiffusion.integrations.diffusers import align  # noqa: E402
from fvdiffusion.integrations.diffusers.pipelines import SUPPORTED_PIPELINES  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

align_module = sys.modules["fvdiffusion.integrations.diffusers.align"]
PROMPT = "a photo of the sea"
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
             "StableDiffusionControlNetPipeline", "DDPMPipeline", "DDIMPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_diffusers.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def no_engine(monkeypatch):
    def fail(**kwargs):
        raise AssertionError("the engine ran for a refused pipeline")

    monkeypatch.setattr(align_module, "sample", fail)


def refused(pipe, prompt=PROMPT, **kwargs) -> str:
    with pytest.raises(UnsupportedPipelineError) as err:
        align(pipe, prompt, Brightness(), method="base", num_images_per_prompt=2, num_inference_steps=2, **kwargs)
    message = str(err.value)
    name = type(pipe).__name__
    assert "\n" not in message
    assert message.startswith(f"{name} is not supported by align(): ")
    assert message.endswith("supported: " + ", ".join(SUPPORTED))
    return message


def bare(name):
    """An instance of diffusers' class ``name`` with no components (nothing of it can run)."""
    cls = getattr(diffusers, name)
    return cls.__new__(cls)


def test_the_allow_list_is_exactly_the_tested_pipelines():
    assert tuple(SUPPORTED_PIPELINES) == SUPPORTED
    for name in SUPPORTED:
        assert hasattr(diffusers, name), name  # names of real diffusers classes


# ---------------------------------------------------------------- refused with real tiny components

def test_sd_inpaint_with_a_4_channel_unet_is_refused(sd, no_engine, count_calls):
    pipe = diffusers.StableDiffusionInpaintPipeline(**sd.components)
    assert pipe.unet.config.in_channels == 4  # the layout the old structural check took for text-to-image
    calls = count_calls(pipe.unet, pipe.vae, pipe.text_encoder)
    assert "`mask_image` would be dropped" in refused(pipe)
    assert calls == []


@pytest.mark.parametrize("name", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_sdxl_img2img_inpaint_and_refiner_are_refused_not_crashing_in_diffusers(sdxl, no_engine, count_calls, name):
    # SDXL's refiner is StableDiffusionXLImg2ImgPipeline; these used to crash in _get_add_time_ids
    pipe = getattr(diffusers, name)(**sdxl.components)
    calls = count_calls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    assert "would be dropped" in refused(pipe)
    assert calls == []


def test_a_subclass_of_a_supported_pipeline_is_refused(sd, no_engine):
    class MyPipeline(diffusers.StableDiffusionPipeline):
        pass

    pipe = MyPipeline(**sd.components)
    assert "not on align()'s list" in refused(pipe)


def test_a_supported_class_without_its_components_is_refused(no_engine):
    pipe = diffusers.DDPMPipeline(unet=None, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(UnsupportedPipelineError, match=r"^DDPMPipeline has no `unet`"):
        align(pipe, None, Brightness(), method="base", num_inference_steps=2)


# ---------------------------------------------------------------- refused by class (no components)

@pytest.mark.parametrize("name,needle", [
    ("StableDiffusionXLControlNetPipeline", "control image"),
    ("StableDiffusionControlNetImg2ImgPipeline", "control image"),
    ("StableDiffusionControlNetInpaintPipeline", "control image"),
    ("StableDiffusionAdapterPipeline", "control image"),
    ("StableDiffusionDepth2ImgPipeline", "init `image`"),
    ("StableDiffusionUpscalePipeline", "init `image`"),
    ("StableDiffusionInstructPix2PixPipeline", "init `image`"),
])
def test_other_sd_image_conditioned_variants_are_refused(no_engine, name, needle):
    assert needle in refused(bare(name))


@pytest.mark.parametrize("name", ["DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "HunyuanDiTPipeline"])
def test_dit_and_pixart_are_refused_as_vp_transformers_not_flow_matching(no_engine, name):
    message = refused(bare(name))
    assert "VP diffusion transformer pipeline (not flow-matching)" in message


@pytest.mark.parametrize("name", ["KandinskyPipeline", "KandinskyV22Pipeline", "KandinskyV22PriorPipeline",
                                  "UnCLIPPipeline", "WuerstchenCombinedPipeline", "StableCascadeDecoderPipeline",
                                  "IFPipeline"])
def test_kandinsky_unclip_and_cascades_are_refused_as_multi_stage(no_engine, name):
    assert "multi-stage" in refused(bare(name))


@pytest.mark.parametrize("name,needle", [
    ("FluxImg2ImgPipeline", "init `image`"), ("FluxInpaintPipeline", "`mask_image`"),
    ("FluxFillPipeline", "`mask_image`"), ("FluxControlNetPipeline", "control image"),
    ("FluxControlPipeline", "control image"), ("FluxKontextPipeline", "init `image`"),
    ("StableDiffusion3Img2ImgPipeline", "init `image`"), ("StableDiffusion3ControlNetPipeline", "control image"),
])
def test_flow_matching_variants_are_refused(no_engine, name, needle):
    assert needle in refused(bare(name))


@pytest.mark.parametrize("name", ["LatentConsistencyModelPipeline", "StableDiffusionPAGPipeline", "SanaPipeline",
                                  "LDMTextToImagePipeline"])
def test_anything_else_is_refused_by_name(no_engine, name):
    assert "not on align()'s list" in refused(bare(name))


def test_an_object_that_is_no_pipeline_is_refused():
    with pytest.raises(UnsupportedPipelineError, match=r"^object is not supported by align\(\)"):
        align(object(), PROMPT, Brightness())


# ---------------------------------------------------------------- SDXL base: supported, golden

@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_base_eta0_reproduces_the_pipeline(sdxl, steps):
    def gen():
        return torch.Generator().manual_seed(3)

    ref = sdxl(PROMPT, num_images_per_prompt=2, num_inference_steps=steps, generator=gen(), output_type="latent").images
    out = align(sdxl, PROMPT, Brightness(), method="base", eta=0.0, num_images_per_prompt=2,
                num_inference_steps=steps, generator=gen(), output_type="latent")
    torch.testing.assert_close(out.result.samples, ref, rtol=1e-5, atol=1e-5)


def test_sdxl_time_ids_follow_height_width_and_the_negative_prompt_its_pooled_embedding(sdxl):
    # 32x16 images: the time ids (original / target size) differ from the default 16x16 ones
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=3, negative_prompt="a red cat", height=32, width=16,
                  guidance_scale=3.0)
    gen = torch.Generator().manual_seed(5)
    ref = sdxl(PROMPT, generator=gen, output_type="latent", **kwargs).images
    out = align(sdxl, PROMPT, Brightness(), method="base", eta=0.0, generator=torch.Generator().manual_seed(5),
                output_type="latent", **kwargs)
    assert ref.shape == (2, 4, 16, 8)
    torch.testing.assert_close(out.result.samples, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SD img2img: supported, golden

@pytest.fixture(scope="module")
def img2img(sd):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(seed=1):
    return torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(seed))  # 24x16: not the UNet's 16x16


def run_img2img(pipe, **kwargs):
    options = dict(method="base", eta=0.0, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0,
                   image=init_image(), output_type="latent")
    options.update(kwargs)
    return align(pipe, PROMPT, Brightness(), **options)


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")
@pytest.mark.parametrize("steps,strength", [(4, 0.5), (4, 1.0), (10, 0.75), (1, 1.0)])
def test_img2img_eta0_reproduces_the_pipeline_from_the_noised_init_latent(img2img, steps, strength):
    image = init_image()
    ref = img2img(PROMPT, image=image, strength=strength, num_images_per_prompt=2, num_inference_steps=steps,
                  guidance_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    out = run_img2img(img2img, image=image, strength=strength, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(3))
    assert ref.shape == out.result.samples.shape == (2, 4, 12, 8)  # the init image's size
    torch.testing.assert_close(out.result.samples, ref, rtol=1e-5, atol=2e-5)
    assert len(out.result.trace) == int(steps * strength)  # the remaining steps of the truncated grid


@pytest.mark.filterwarnings("ignore:You have passed 4 text prompts")
def test_img2img_prompt_list_shares_the_init_image_like_the_pipeline(img2img):
    prompts = [PROMPT, "a red cat on the mat"]
    ref = img2img(prompts, image=init_image(), strength=0.75, num_images_per_prompt=2, num_inference_steps=4,
                  guidance_scale=2.0, generator=torch.Generator().manual_seed(4), output_type="latent").images
    outs = align(img2img, prompts, Brightness(), method="base", eta=0.0, num_images_per_prompt=2, num_inference_steps=4,
                 guidance_scale=2.0, image=init_image(), strength=0.75, generator=torch.Generator().manual_seed(4),
                 output_type="latent")
    torch.testing.assert_close(torch.cat([o.result.samples for o in outs]), ref, rtol=1e-5, atol=2e-5)


def test_img2img_with_a_seed_uses_the_image_and_the_seed(img2img):
    a = run_img2img(img2img, seed=0, method="fvd", lam=10.0, eta=1.0).result.samples
    assert torch.equal(a, run_img2img(img2img, seed=0, method="fvd", lam=10.0, eta=1.0).result.samples)
    assert not torch.allclose(a, run_img2img(img2img, seed=1, method="fvd", lam=10.0, eta=1.0).result.samples)
    other = run_img2img(img2img, seed=0, method="fvd", lam=10.0, eta=1.0, image=init_image(2)).result.samples
    assert not torch.allclose(a, other)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(image=None), "needs an init image"),
    (dict(strength=1.5), "strength must be a number in [0, 1]"),
    (dict(strength=0.1), "leaves no step to run"),
    (dict(latents=torch.zeros(2, 4, 12, 8)), "latents does not apply"),
    (dict(height=32), "height does not apply"),
    (dict(image=[init_image(), init_image()]), "pass one init image"),
    (dict(method="dts"), "cannot start from the noised init image"),
])
def test_img2img_wrong_arguments_are_one_line_errors_before_any_model_runs(img2img, no_engine, count_calls, kwargs,
                                                                           needle):
    calls = count_calls(img2img.unet, img2img.vae, img2img.text_encoder)
    with pytest.raises(ValueError) as err:
        run_img2img(img2img, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert calls == []


def test_an_init_image_for_a_text_to_image_pipeline_is_refused(sd):
    with pytest.raises(ValueError, match="takes no init image: image applies to StableDiffusionImg2ImgPipeline"):
        align(sd, PROMPT, Brightness(), image=init_image(), num_inference_steps=2)


# ---------------------------------------------------------------- SD ControlNet: supported, golden

def tiny_controlnet(sd, seed=0):
    """A ControlNetModel from the tiny SD UNet whose zero convolutions are made non-zero (else its residuals are 0)."""
    controlnet = diffusers.ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8)).eval()
    gen = torch.Generator().manual_seed(seed)
    zero_init = [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters(),
                 *controlnet.controlnet_cond_embedding.conv_out.parameters()]
    with torch.no_grad():
        for param in zero_init:
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return controlnet


@pytest.fixture(scope="module")
def controlnet_pipe(sd):
    pipe = diffusers.StableDiffusionControlNetPipeline(**sd.components, controlnet=tiny_controlnet(sd))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(seed=2, size=(24, 16)):
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))  # 24x16: not the UNet's 16x16


def run_controlnet(pipe, **kwargs):
    options = dict(method="base", eta=0.0, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0,
                   image=control_image(), output_type="latent")
    options.update(kwargs)
    return align(pipe, PROMPT, Brightness(), **options)


@pytest.mark.parametrize("guidance,scale", [(2.0, 1.0), (1.0, 1.0), (3.0, 0.5)])
def test_controlnet_eta0_reproduces_the_pipeline_with_the_same_latents(controlnet_pipe, guidance, scale):
    latents = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(7))
    ref = controlnet_pipe(PROMPT, image=control_image(), latents=latents, num_images_per_prompt=2, output_type="latent",
                          num_inference_steps=4, guidance_scale=guidance,
                          controlnet_conditioning_scale=scale).images
    out = run_controlnet(controlnet_pipe, latents=latents, guidance_scale=guidance, controlnet_conditioning_scale=scale)
    assert ref.shape == out.result.samples.shape == (2, 4, 12, 8)  # the control image's size
    torch.testing.assert_close(out.result.samples, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.filterwarnings("ignore:You have passed 4 text prompts")
def test_controlnet_generator_prompt_list_and_height_width_follow_the_pipeline(controlnet_pipe):
    prompts = [PROMPT, "a red cat on the mat"]
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0, height=16, width=24,
                  output_type="latent")
    ref = controlnet_pipe(prompts, image=control_image(), generator=torch.Generator().manual_seed(4), **kwargs).images
    outs = align(controlnet_pipe, prompts, Brightness(), method="base", eta=0.0, image=control_image(),
                 generator=torch.Generator().manual_seed(4), **kwargs)
    assert ref.shape == (4, 4, 8, 12)  # resized to height x width as the pipeline resizes it
    torch.testing.assert_close(torch.cat([o.result.samples for o in outs]), ref, rtol=1e-5, atol=2e-5)


def test_the_control_image_changes_the_samples(controlnet_pipe):
    latents = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(7))
    a = run_controlnet(controlnet_pipe, latents=latents).result.samples
    assert not torch.allclose(a, run_controlnet(controlnet_pipe, latents=latents, image=control_image(3)).result.samples)
    assert not torch.allclose(a, run_controlnet(controlnet_pipe, latents=latents,
                                                controlnet_conditioning_scale=0.0).result.samples)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(image=None), "needs its control image"),
    (dict(image=[control_image(), control_image()]), "pass one control image"),
    (dict(strength=0.5), "strength does not apply"),
    (dict(control_guidance_start=0.2), "control_guidance_start=0.2 is not supported"),
    (dict(control_guidance_end=0.8), "control_guidance_end=0.8 is not supported"),
    (dict(guess_mode=True), "guess_mode=True is not supported"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5]), "controlnet_conditioning_scale must be a number"),
])
def test_controlnet_wrong_arguments_are_one_line_errors_before_any_model_runs(controlnet_pipe, no_engine, count_calls,
                                                                              kwargs, needle):
    calls = count_calls(controlnet_pipe.unet, controlnet_pipe.vae, controlnet_pipe.text_encoder,
                        controlnet_pipe.controlnet)
    with pytest.raises(ValueError) as err:
        run_controlnet(controlnet_pipe, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert calls == []


def test_multi_controlnet_is_refused_in_one_line(sd, no_engine, count_calls):
    pipe = diffusers.StableDiffusionControlNetPipeline(**sd.components,
                                                       controlnet=[tiny_controlnet(sd, 0), tiny_controlnet(sd, 1)])
    calls = count_calls(pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(UnsupportedPipelineError) as err:
        run_controlnet(pipe, image=[control_image(), control_image(3)])
    message = str(err.value)
    assert "MultiControlNetModel" in message and "single ControlNetModel" in message and "\n" not in message
    assert calls == []


def test_controlnet_arguments_on_another_pipeline_are_refused(sd):
    with pytest.raises(ValueError, match="has no ControlNet: controlnet_conditioning_scale applies"):
        align(sd, PROMPT, Brightness(), controlnet_conditioning_scale=1.0, num_inference_steps=2)
