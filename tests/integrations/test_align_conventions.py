"""align() takes diffusers' arguments and returns a diffusers-like output (tiny, random, real pipelines).

generator / latents / num_images_per_prompt / height / width / negative_prompt / output_type /
callback_on_step_end / prompt lists / the safety checker / duplicates, and a one-line error for
each wrong argument. Where diffusers computes the same thing (DDIM, eta = 0, method "base"), the
test compares with the pipeline itself.
"""

import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)
from tiny_diffusers import sd  # noqa: E402,F401  (module fixture)

import fvdiffusion  # noqa: E402
from fvdiffusion.errors import DuplicateImagesWarning  # noqa: E402
from fvdiffusion.integrations.diffusers import AlignResult, align  # noqa: E402
from fvdiffusion.result import StepTrace  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

PROMPT = "a photo of the sea"
OTHER = "a red cat on the mat"
N = 3


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler

    pipe = tiny_diffusers.ddpm_pipeline()
    pipe.scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)  # the engine's own step: no warning
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt=PROMPT, **kwargs):
    options = dict(method="base", eta=0.0, num_images_per_prompt=N, num_inference_steps=3)
    if prompt is not None:
        options["guidance_scale"] = 2.0
    options.update(kwargs)
    return align(pipe, prompt, Brightness(), **options)


def reference(pipe, prompt=PROMPT, **kwargs):
    """The pipeline's own latents for the same arguments (its DDIM scheduler at eta = 0)."""
    options = dict(num_images_per_prompt=N, num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    options.update(kwargs)
    return pipe(prompt, **options).images


# ---------------------------------------------------------------- generator, latents, particles

def test_generator_draws_the_latents_as_the_pipeline_does_then_the_engine_seed(sd):
    torch.testing.assert_close(run(sd, generator=gen(4), output_type="latent").result.samples,
                               reference(sd, generator=gen(4)), rtol=1e-5, atol=1e-5)
    # eta = 1: the step noise comes from the engine seed, drawn from the generator after the latents
    latents = torch.randn(N, 4, 8, 8, generator=gen(9))
    a = run(sd, generator=gen(1), latents=latents, eta=1.0).result
    b = run(sd, generator=gen(1), latents=latents, eta=1.0).result
    c = run(sd, generator=gen(2), latents=latents, eta=1.0).result
    assert torch.equal(a.samples, b.samples) and not torch.allclose(a.samples, c.samples)
    # the engine seed: torch.randint(0, 2**63 − 1) from the generator, after the latents when it drew them
    g = gen(1)
    torch.randn(N, 4, 8, 8, generator=g)
    assert run(sd, generator=gen(1)).result.config["seed"] == torch.randint(0, 2**63 - 1, (1,), generator=g).item()
    assert a.config["seed"] == torch.randint(0, 2**63 - 1, (1,), generator=gen(1)).item()  # latents given: none drawn


def test_latents_are_the_initial_noise(sd):
    latents = torch.randn(N, 4, 8, 8, generator=gen(11))
    out = run(sd, latents=latents, output_type="latent")
    torch.testing.assert_close(out.result.samples, reference(sd, latents=latents.clone()), rtol=1e-5, atol=1e-5)
    other = run(sd, latents=torch.randn(N, 4, 8, 8, generator=gen(12)), output_type="latent")
    assert not torch.allclose(out.result.samples, other.result.samples)


def test_seed_without_generator_keeps_the_engines_own_noise(sd):
    a, b = run(sd, seed=5, eta=1.0), run(sd, seed=5, eta=1.0)
    assert torch.equal(a.result.samples, b.result.samples) and a.result.config["seed"] == 5
    assert run(sd).result.config["seed"] == 0  # neither seed nor generator: seed 0


def test_num_images_per_prompt_is_the_particle_count_and_n_particles_its_alias(sd):
    out = run(sd, num_images_per_prompt=4, output_type="pt")
    assert out.images.shape == (4, 3, 16, 16) and out.result.config["n_particles"] == 4
    alias = run(sd, num_images_per_prompt=None, n_particles=4, output_type="pt")
    assert torch.equal(alias.images, out.images)
    assert len(run(sd, num_images_per_prompt=None).images) == 8  # the default


def test_height_width_and_negative_prompt_reach_the_unet(sd):
    out = run(sd, height=24, width=32, negative_prompt="blurry", generator=gen(0))
    assert out.images[0].size == (32, 24) and out.result.samples.shape == (N, 4, 12, 16)
    expected = reference(sd, height=24, width=32, negative_prompt="blurry", generator=gen(0))
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-5)


def test_guidance_scale_defaults_to_the_pipelines_own(sd):
    out = align(sd, PROMPT, Brightness(), method="base", eta=0.0, num_images_per_prompt=N, num_inference_steps=3,
                generator=gen(0), output_type="latent")
    expected = sd(PROMPT, num_images_per_prompt=N, num_inference_steps=3, generator=gen(0), output_type="latent").images
    torch.testing.assert_close(out.result.samples, expected, rtol=1e-5, atol=1e-5)  # 7.5 on both sides


# ---------------------------------------------------------------- prompt lists

def test_a_prompt_list_runs_one_population_per_prompt_like_the_pipeline(sd):
    outs = run(sd, [PROMPT, OTHER], generator=gen(6), negative_prompt=["blurry", "dark"], output_type="latent")
    assert isinstance(outs, list) and [o.prompt for o in outs] == [PROMPT, OTHER]
    expected = reference(sd, [PROMPT, OTHER], generator=gen(6), negative_prompt=["blurry", "dark"])
    got = torch.cat([o.result.samples for o in outs])  # the pipeline's order: prompt-major
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert outs[0].result.config["seed"] != outs[1].result.config["seed"]
    assert isinstance(run(sd, [PROMPT]), list)


def test_a_prompt_list_with_a_seed_gives_prompt_i_seed_plus_i(sd):
    outs = run(sd, [PROMPT, OTHER], seed=3, eta=1.0)
    for i, (prompt, out) in enumerate(zip([PROMPT, OTHER], outs)):
        single = run(sd, prompt, seed=3 + i, eta=1.0)
        assert out.result.config["seed"] == 3 + i and torch.equal(out.result.samples, single.result.samples)


# ---------------------------------------------------------------- outputs

def test_output_types_hold_the_same_ranked_images(sd):
    outs = {kind: run(sd, generator=gen(2), output_type=kind) for kind in ("pil", "np", "pt", "latent")}
    pt, arr = outs["pt"].images, outs["np"].images
    assert isinstance(pt, torch.Tensor) and pt.shape == (N, 3, 16, 16) and pt.dtype == torch.float32
    assert isinstance(arr, np.ndarray) and arr.shape == (N, 16, 16, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    pil = outs["pil"].images
    assert all(isinstance(im, Image.Image) for im in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))
    latent = outs["latent"]
    assert torch.equal(latent.images, latent.result.samples[latent.ranking])
    assert all(torch.equal(o.ranking, latent.ranking) for o in outs.values())
    # the mean brightness of images[i] is rewards[i]: the images are in reward order
    torch.testing.assert_close(pt.mean(dim=(1, 2, 3)), outs["pt"].rewards.float(), rtol=0, atol=1e-6)
    # no final decode for latents: every decode was a reward evaluation
    assert latent.result.cost.extra["vae_decodes"] == latent.result.cost.reward_calls
    # base keeps the final reward's images for the output: decoded once, not twice (issue 21 item 6)
    assert outs["pt"].result.cost.extra["vae_decodes"] == outs["pt"].result.cost.reward_calls
    assert latent.nsfw_content_detected is None and outs["pil"].nsfw_content_detected is None  # no checker


def test_pixel_pipeline_outputs(ddpm):
    out = run(ddpm, None, output_type="np", eta=1.0)
    assert out.images.shape == (N, 8, 8, 3)
    latent = run(ddpm, None, output_type="latent", eta=1.0)  # raw samples in [−1, 1], not mapped
    assert torch.equal(latent.images, latent.result.samples[latent.ranking])
    np.testing.assert_allclose(out.images, ((latent.images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_callback_on_step_end_observes_step_index_timestep_and_trace_row(sd):
    seen = []

    def on_step_end(pipe, i, t, kwargs):
        seen.append((pipe, i, t, kwargs["trace"], tuple(kwargs["latents"].shape), kwargs["prompt_index"]))
        kwargs["latents"].mul_(0)  # diffusers would take latents back: here it changes nothing
        return {"latents": torch.zeros(1)}

    out = run(sd, generator=gen(0), callback_on_step_end=on_step_end, num_inference_steps=4)
    probe = copy.deepcopy(sd.scheduler)
    probe.set_timesteps(4)
    assert [s[1] for s in seen] == [0, 1, 2, 3] and [s[2] for s in seen] == probe.timesteps.tolist()
    assert all(s[0] is sd and isinstance(s[3], StepTrace) and s[4] == (N, 4, 8, 8) and s[5] == 0 for s in seen)
    assert [s[3] for s in seen] == out.result.trace  # the step's own trace row
    assert torch.equal(out.result.samples, run(sd, generator=gen(0), num_inference_steps=4).result.samples)
    outs = run(sd, [PROMPT, OTHER], callback_on_step_end=lambda p, i, t, kw: seen.append(kw["prompt"]))
    assert seen[-6:] == [PROMPT] * 3 + [OTHER] * 3 and len(outs) == 2


# ---------------------------------------------------------------- the safety checker

def with_safety_checker(sd):
    """The tiny SD pipeline with a tiny random StableDiffusionSafetyChecker and its CLIP image processor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    config = CLIPConfig(text_config=tiny_diffusers._text_config().to_dict(), vision_config=vision, projection_dim=8)
    checker = StableDiffusionSafetyChecker(config).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pipe = StableDiffusionPipeline(**{**sd.components, "safety_checker": checker, "feature_extractor": extractor})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flag_about_half(pipe, images):
    """Set the checker's thresholds so that about half of these images count as flagged (random weights)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    checker = pipe.safety_checker
    clip_input = pipe.feature_extractor(pipe.numpy_to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        checker.concept_embeds[0] = torch.randn(checker.concept_embeds.shape[1], generator=gen(0))
        cos = cosine_distance(embeds, checker.concept_embeds[:1])[:, 0]
        checker.concept_embeds_weights.fill_(2.0)  # cosines never exceed 1: only concept 0 can flag
        checker.special_care_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = cos.median()


def test_the_safety_checker_runs_as_in_the_pipeline(sd):
    pipe = with_safety_checker(sd)
    kwargs = dict(num_images_per_prompt=6, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    plain = sd(PROMPT, generator=gen(0), **kwargs).images
    flag_about_half(pipe, plain)
    expected = pipe(PROMPT, generator=gen(0), **kwargs)
    assert 0 < sum(expected.nsfw_content_detected) < 6
    out = run(pipe, generator=gen(0), num_images_per_prompt=6, output_type="np")
    order = out.ranking.tolist()
    assert out.nsfw_content_detected == [expected.nsfw_content_detected[i] for i in order]
    np.testing.assert_allclose(out.images, expected.images[order], atol=1e-5)
    for image, flagged, before in zip(out.images, out.nsfw_content_detected, plain[order]):
        assert (image == 0).all() if flagged else np.allclose(image, before, atol=1e-5)
    assert run(pipe, generator=gen(0), output_type="latent").nsfw_content_detected is None
    broken = copy.copy(pipe)
    broken.feature_extractor = None
    with pytest.raises(ValueError, match="safety_checker but no feature_extractor"):
        run(broken)


# ---------------------------------------------------------------- duplicates

def test_duplicates_are_counted_and_reported_once(sd):
    options = dict(method="smc", lam=100.0, eta=0.0, num_images_per_prompt=8, num_inference_steps=4, seed=0)
    with pytest.warns(DuplicateImagesWarning, match=r"of 8 returned images are copies") as record:
        out = run(sd, **options)
    assert len([w for w in record if issubclass(w.category, DuplicateImagesWarning)]) == 1
    distinct = torch.unique(out.result.samples, dim=0).shape[0]
    assert distinct < 8 and out.duplicates == 8 - distinct and out.distinct_images == distinct
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateImagesWarning)
        independent = run(sd, method="base", num_images_per_prompt=8, num_inference_steps=4)
    assert independent.duplicates == 0 and independent.distinct_images == 8


# ---------------------------------------------------------------- wrong arguments: one line each

@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(output_type="tensor"), ValueError, "output_type must be one of 'pil', 'np', 'pt', 'latent', got 'tensor'"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt .* must be a positive integer, got 0"),
    (dict(num_images_per_prompt=2, n_particles=3), ValueError, "name the same thing"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator, got int"),
    (dict(generator=[torch.Generator()]), ValueError, "pass one torch.Generator"),
    (dict(generator=torch.Generator(), seed=1), ValueError, "either generator or seed"),
    (dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, r"latents must be a tensor of shape \(3, 4, 8, 8\).*got \(2, 4, 8, 8\)"),
    (dict(latents=np.zeros((3, 4, 8, 8))), ValueError, r"latents must be a tensor .* got ndarray"),
    (dict(latents=torch.full((3, 4, 8, 8), float("nan"))), ValueError, "latents contain NaN"),
    (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end must be callable"),
    (dict(height=15), ValueError, "multiples of the VAE scale factor"),
    (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries for 1 prompt"),
    (dict(negative_prompt=3), TypeError, "negative_prompt must be a string"),
    (dict(guidance_rescale=0.7), ValueError, "does not support StableDiffusionPipeline's argument 'guidance_rescale'"),
    (dict(prompt_embeds=torch.zeros(1)), ValueError, "argument 'prompt_embeds'"),
    (dict(num_steps=4), ValueError, "num_inference_steps, not num_steps"),
    (dict(seed=-1), fvdiffusion.ConfigError, "seed"),
    (dict(rebirth_nois=0.5, method="fvd"), fvdiffusion.ConfigError, "rebirth_nois"),
])
def test_wrong_arguments_are_one_line_errors(sd, kwargs, error, needle):
    with pytest.raises(error, match=needle) as info:
        run(sd, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prompt, kwargs, error, needle", [
    (None, {}, ValueError, "text-to-image pipeline: pass the prompt as a string"),
    ([], {}, ValueError, "empty list"),
    ([PROMPT, 3], {}, TypeError, "prompt lists must hold strings, got int"),
    (3, {}, TypeError, "prompt must be a string, a list of strings or None, got int"),
])
def test_wrong_prompts_are_one_line_errors(sd, prompt, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        align(sd, prompt, Brightness(), **kwargs)


@pytest.mark.parametrize("prompt, kwargs, needle", [
    (PROMPT, {}, "unconditional: pass prompt=None"),
    ([PROMPT], {}, "unconditional: pass prompt=None"),
    (None, dict(guidance_scale=3.0), "unconditional: guidance_scale does not apply"),
    (None, dict(negative_prompt="x"), "unconditional: negative_prompt does not apply"),
    (None, dict(height=16), r"samples 8x8 pixels .* height=16 is not supported"),
])
def test_wrong_arguments_for_a_pixel_pipeline(ddpm, prompt, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        align(ddpm, prompt, Brightness(), **kwargs)


def test_align_result_keeps_its_old_positional_fields():
    result = AlignResult([], torch.zeros(0), torch.zeros(0, dtype=torch.long), None)
    assert result.nsfw_content_detected is None and result.duplicates == 0 and result.distinct_images == 0
