"""align() against what a diffusion practitioner passes from their own setup (issue 21): every
mistake is one line before any model runs, or works as the user expects; nothing is silent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread, sd  # noqa: E402,F401  (fixtures)

import sharded_runs as runs  # noqa: E402
from fvdiffusion.launch import launch  # noqa: E402

pytest.importorskip("diffusers")


# --- item 1: per-rank calls under a process group --------------------------------------------------

@pytest.mark.parametrize("what, named", [("prompt", "prompt"), ("negative_prompt", "negative_prompt"),
                                         ("generator", "generator state"), ("n", "num_images_per_prompt"),
                                         ("steps", "num_inference_steps")])
def test_per_rank_align_calls_are_refused_on_every_rank_naming_what_differs(what, named):
    messages = launch(runs.align_per_rank_call, (what,), nproc=2, every_rank=True, timeout_s=60)
    assert len(set(messages)) == 1, messages
    line = messages[0]
    assert line.startswith("ConfigError: rank 1 of 2 called align() with a different"), line
    assert f" {named} " in line and "sharded=False" in line and "\n" not in line


def test_per_rank_prompts_with_sharded_false_run_each_rank_alone():
    assert launch(runs.align_per_rank_call, ("sharded_false",), nproc=2, every_rank=True, timeout_s=60) == \
        ["no error", "no error"]


# --- item 2: reward protocols ---------------------------------------------------------------------

from fvdiffusion import align  # noqa: E402
from fvdiffusion.errors import RewardError  # noqa: E402
from fvdiffusion.rewards.composite import WeightedSum  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness, Colourfulness  # noqa: E402

PROMPT = "a photo of the sea"
SMALL = dict(method="fvd", num_images_per_prompt=4, num_inference_steps=2, guidance_scale=2.0, seed=0,
             output_type="latent")


def test_a_das_style_reward_gets_one_prompt_string_per_image(sd):
    seen = []

    def das_reward(images, prompts):
        seen.append(list(prompts))
        return torch.stack([images[i].mean() * len(prompts[i]) for i in range(len(images))])

    align(sd, [PROMPT, "a cat"], das_reward, batch_size=2, **SMALL)
    assert seen and {tuple(p) for p in seen} == {(PROMPT, PROMPT), ("a cat", "a cat")}


@pytest.mark.parametrize("convert", [lambda r: r.numpy(), lambda r: r.tolist()], ids=["numpy", "list"])
def test_numpy_and_list_rewards_work_like_tensors(sd, convert):
    got = align(sd, PROMPT, lambda images, prompt: convert(Brightness()(images)), **SMALL)
    want = align(sd, PROMPT, Brightness(), **SMALL)
    assert torch.equal(got.images, want.images)
    torch.testing.assert_close(got.rewards.double(), want.rewards.double())


def test_a_reward_that_reduces_the_batch_is_one_line_naming_it(sd):
    def mean_brightness(images, prompt):
        return images.mean()

    with pytest.raises(RewardError) as info:
        align(sd, PROMPT, mean_brightness, **SMALL)
    line = str(info.value)
    assert "\n" not in line and "reward 'mean_brightness' returned one number (a 0-d tensor) for 4 images" in line
    assert "expected a float tensor of shape (4,)" in line


def test_a_weighted_sum_of_image_rewards_steers_on_the_sum(sd):
    combined = WeightedSum({"brightness": (Brightness(), 1.0), "colour": (Colourfulness(), 0.01)})
    got = align(sd, PROMPT, combined, **SMALL)
    manual = align(sd, PROMPT, lambda im, p: Brightness()(im).double() + 0.01 * Colourfulness()(im).double(),
                   **SMALL)
    torch.testing.assert_close(got.rewards.double(), manual.rewards.double(), rtol=0, atol=1e-9)
    assert torch.equal(got.images, manual.images)


# --- item 3: callbacks --------------------------------------------------------------------------

import warnings  # noqa: E402

from fvdiffusion.errors import CallbackChangesIgnoredWarning  # noqa: E402


def test_diffusers_pipeline_callbacks_are_refused_by_name_before_any_model_runs(sd):
    from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback

    for cb in (SDCFGCutoffCallback(cutoff_step_ratio=0.5), MultiPipelineCallbacks([SDCFGCutoffCallback()])):
        calls = sd.unet.forward
        with pytest.raises(ValueError) as info:
            align(sd, PROMPT, Brightness(), callback_on_step_end=cb, **SMALL)
        line = str(info.value)
        assert "\n" not in line and f"{type(cb).__name__} is a diffusers PipelineCallback" in line
        assert sd.unet.forward == calls


@pytest.mark.parametrize("how", ["returned", "in_place"])
def test_a_callback_that_changes_the_latents_gets_one_warning_and_changes_nothing(sd, how):
    def double_latents(pipe, step, timestep, kwargs):
        if how == "returned":
            kwargs["latents"] = kwargs["latents"] * 2
        else:
            kwargs["latents"].mul_(2)
        return kwargs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = align(sd, [PROMPT, "a cat"], Brightness(), callback_on_step_end=double_latents, **SMALL)
    ours = [w for w in caught if issubclass(w.category, CallbackChangesIgnoredWarning)]
    assert len(ours) == 1 and "not applied" in str(ours[0].message) and "latents" in str(ours[0].message)
    want = align(sd, [PROMPT, "a cat"], Brightness(), **SMALL)
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, want))


def test_an_observing_callback_that_returns_its_kwargs_gets_no_warning(sd):
    seen = []

    def observe(pipe, step, timestep, kwargs):
        seen.append(float(kwargs["latents"].mean()))
        return kwargs

    with warnings.catch_warnings():
        warnings.simplefilter("error", CallbackChangesIgnoredWarning)
        align(sd, PROMPT, Brightness(), callback_on_step_end=observe, **SMALL)
    assert len(seen) == 2


# --- item 4: outputs ----------------------------------------------------------------------------

def test_align_result_reads_like_a_diffusers_pipeline_output(sd):
    out = align(sd, PROMPT, Brightness(), **{**SMALL, "output_type": "pt"})
    assert out[0] is out.images and out["images"] is out.images and out["rewards"] is out.rewards
    assert out.to_tuple() == (out.images,)  # no safety checker: nsfw_content_detected is None, dropped
    images, = out.to_tuple()
    assert images.shape == (4, 3, 16, 16) and "nsfw_content_detected" not in out.keys()
    with pytest.raises(KeyError, match="no field 'image'"):
        out["image"]


def test_flatten_returns_one_result_for_a_prompt_list_as_the_pipeline_does(sd):
    per_prompt = align(sd, [PROMPT, "a cat"], Brightness(), **{**SMALL, "output_type": "pil"})
    flat = align(sd, [PROMPT, "a cat"], Brightness(), flatten=True, **{**SMALL, "output_type": "pil"})
    assert len(flat.images) == 8 and flat.prompt == [PROMPT] * 4 + ["a cat"] * 4
    assert [im.tobytes() for im in flat.images] == [im.tobytes() for r in per_prompt for im in r.images]
    assert torch.equal(flat.rewards, torch.cat([r.rewards for r in per_prompt]))
    assert len(flat.result) == 2 and flat[0] is flat.images
    with pytest.raises(TypeError, match="flatten must be True or False"):
        align(sd, PROMPT, Brightness(), flatten="yes", **SMALL)


def test_outputs_come_back_in_the_pipeline_s_dtype():
    pipe = tiny_diffusers.sd_pipeline().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    latent = align(pipe, PROMPT, Brightness(), **SMALL)
    pt = align(pipe, PROMPT, Brightness(), **{**SMALL, "output_type": "pt"})
    np_out = align(pipe, PROMPT, Brightness(), **{**SMALL, "output_type": "np"})
    assert latent.images.dtype == torch.float64 and pt.images.dtype == torch.float64
    assert np_out.images.dtype.name == "float32"  # diffusers' "np" output is float32 whatever the pipeline
    reference = pipe(PROMPT, num_inference_steps=2, guidance_scale=2.0, output_type="latent").images
    assert reference.dtype == latent.images.dtype


# --- item 7: accelerate in the diffusers extra ----------------------------------------------------

def test_the_diffusers_extra_brings_accelerate_so_loading_a_pipeline_prints_no_notice(tmp_path, capfd):
    import tomllib

    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert any(req.startswith("accelerate") for req in pyproject["project"]["optional-dependencies"]["diffusers"])
    tiny_diffusers.ddpm_pipeline().save_pretrained(tmp_path / "ddpm")
    capfd.readouterr()
    diffusers_logging.set_verbosity_warning()
    DDPMPipeline.from_pretrained(tmp_path / "ddpm")
    captured = capfd.readouterr()
    assert "accelerate" not in captured.err + captured.out
