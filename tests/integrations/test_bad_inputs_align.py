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


# --- item 6: base decodes its final images once ----------------------------------------------------

def _counting_vae_rows(pipe):
    rows = []
    real = pipe.vae.decode

    def decode(z, *args, **kwargs):
        rows.append(int(z.shape[0]))
        return real(z, *args, **kwargs)

    pipe.vae.decode = decode
    return rows, real


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_base_decodes_its_final_images_once(sd, output_type):
    from fvdiffusion.integrations.diffusers.rewards import LatentImageReward

    rows, real = _counting_vae_rows(sd)
    try:
        out = align(sd, PROMPT, Brightness(), **{**SMALL, "method": "base", "output_type": output_type},
                    batch_size=3)
    finally:
        sd.vae.decode = real
    assert sum(rows) == 4 and out.result.cost.extra["vae_decodes"] == 4  # was 8: final reward, then output
    if output_type == "pt":  # the kept images are the ones a fresh decode gives
        fresh = LatentImageReward(sd, Brightness(), batch_size=3).decode(out.result.samples)[out.ranking]
        assert torch.equal(out.images.float(), fresh)


def test_a_reward_that_writes_into_its_images_does_not_change_base_s_output(sd):
    def scribbler(images, prompt):
        r = images.mean(dim=(1, 2, 3))
        images.fill_(0.0)
        return r

    got = align(sd, PROMPT, scribbler, **{**SMALL, "method": "base", "output_type": "pt"})
    want = align(sd, PROMPT, Brightness(), **{**SMALL, "method": "base", "output_type": "pt"})
    assert torch.equal(got.images, want.images) and float(got.images.max()) > 0


@pytest.mark.parametrize("options, reward_calls", [({}, 4 * 4 + 4), ({"selection_interval": 2}, 4 * 2 + 4),
                                                    ({"selection_start": 0.5}, 4 * 2 + 4)])
def test_selecting_less_often_saves_reward_calls_and_decodes(sd, options, reward_calls):
    """The cost recipe of docs/diffusers.md: reward calls and decodes follow the selection schedule."""
    out = align(sd, PROMPT, Brightness(), **{**SMALL, "num_inference_steps": 4, "output_type": "pt"}, **options)
    assert out.result.cost.reward_calls == reward_calls and out.result.cost.denoiser_calls == 16
    assert out.result.cost.extra["vae_decodes"] == reward_calls + 4  # the returned images: N more


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


# --- item 5: fvd t2i ----------------------------------------------------------------------------

import json  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from fvdiffusion.bench import t2i as t2i_runner  # noqa: E402
from fvdiffusion.bench import t2i_rewards  # noqa: E402
from fvdiffusion.cli import app as fvd_app  # noqa: E402


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_diffusers.sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    from fvdiffusion.integrations.diffusers.export_mnist import export_ddpm_pipeline

    return export_ddpm_pipeline(tmp_path_factory.mktemp("mnist") / "pipe")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red apple\nthe sea at night\n")
    return path


def t2i(model, out, *extra, prompts=None, reward="brightness"):
    source = ["--prompts", str(prompts)] if prompts is not None else ["--populations", "1"]
    return CliRunner().invoke(fvd_app, ["t2i", "--model", str(model), *source, "--reward", reward,
                                        "--particles", "2", "--steps", "2", "--device", "cpu", "--threads", "1",
                                        "--no-progress", "--out", str(out), *extra])


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def align_calls(monkeypatch):
    calls = []
    real = t2i_runner.align

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(t2i_runner, "align", counting)
    return calls


@pytest.mark.parametrize("flags, named", [
    (["--reward", "brightness"], "--reward brightness"),
    (["--reward", "digit", "--reward-model", "3", "--eval-reward", "colourfulness"], "--eval-reward colourfulness"),
])
def test_t2i_rewards_that_cannot_score_the_pipeline_s_images_fail_before_any_sampling(mnist_dir, tmp_path, flags,
                                                                                        named, align_calls):
    reward = flags[1]
    line = error_line(t2i(mnist_dir, tmp_path / "out", *flags[2:], reward=reward))
    assert named in line and "[2, 1, 28, 28]" in line, line
    assert align_calls == [] and not (tmp_path / "out" / "run.json").exists()


def test_t2i_a_failed_run_never_blocks_its_own_retry(sd_dir, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(t2i_runner, "align", failing)
    first = t2i(sd_dir, out, "--lam", "5", prompts=prompts_file)
    assert first.exit_code != 0 and (out / "run.json").exists()
    monkeypatch.undo()
    retry = t2i(sd_dir, out, "--lam", "2", prompts=prompts_file)  # the fix: other settings
    assert retry.exit_code == 0, retry.output
    assert json.loads((out / "run.json").read_text())["options"]["lam"] == 2.0
    # once a prompt is done, run.json binds
    assert "lam" in error_line(t2i(sd_dir, out, "--lam", "3", prompts=prompts_file))


def test_t2i_guidance_defaults_to_the_pipeline_s_own(sd_dir, prompts_file, tmp_path, align_calls):
    assert t2i(sd_dir, tmp_path / "out", prompts=prompts_file).exit_code == 0
    assert [k["guidance_scale"] for k in align_calls] == [None, None]  # align() then uses the pipeline's
    assert json.loads((tmp_path / "out" / "run.json").read_text())["guidance"] is None
    assert t2i(sd_dir, tmp_path / "out2", "--guidance", "3", prompts=prompts_file).exit_code == 0
    assert [k["guidance_scale"] for k in align_calls[2:]] == [3.0, 3.0]


@pytest.mark.parametrize("extra, needle", [
    (["--reward-model", "some/dir"], "--reward-model 'some/dir': --reward brightness takes no model"),
    (["--clip-model", "some/dir"], "--clip-model 'some/dir': --reward brightness takes no CLIP model"),
    (["--eval-reward", "jpeg", "--eval-reward-model", "x"], "--eval-reward-model 'x': --eval-reward jpeg takes no"),
    (["--eval-clip-model", "x"], "--eval-clip-model needs --eval-reward"),
])
def test_t2i_model_paths_given_to_a_reward_that_takes_none_are_refused(sd_dir, prompts_file, tmp_path, extra,
                                                                        needle, align_calls):
    assert needle in error_line(t2i(sd_dir, tmp_path / "out", *extra, prompts=prompts_file))
    assert align_calls == []


def test_t2i_clip_model_reaches_every_model_reward(monkeypatch):
    built = {}

    class Fake:
        def __init__(self, *args, **kwargs):
            built[type(self).__name__] = (args, kwargs)

    monkeypatch.setattr(t2i_rewards.model_rewards, "AestheticScore", type("AestheticScore", (Fake,), {}))
    monkeypatch.setattr(t2i_rewards.model_rewards, "PickScore", type("PickScore", (Fake,), {}))
    monkeypatch.setattr(t2i_rewards.model_rewards, "CLIPScore", type("CLIPScore", (Fake,), {}))
    t2i_rewards.build_reward("aesthetic", "mlp.safetensors", "clip-dir", "cpu")
    t2i_rewards.build_reward("pickscore", "pick-dir", "processor-dir", "cpu")
    t2i_rewards.build_reward("clip", "clip-dir", None, "cpu")
    assert built["AestheticScore"][0][:2] == ("mlp.safetensors", "clip-dir")
    assert built["PickScore"] == (("pick-dir",), {"processor": "processor-dir", "device": "cpu"})
    assert built["CLIPScore"][0] == ("clip-dir",)
    assert {name for name, spec in t2i_rewards.REWARDS.items() if spec.model_help} >= {"clip", "aesthetic",
                                                                                      "pickscore", "digit"}


def test_t2i_the_clip_model_flag_reaches_the_run(sd_dir, prompts_file, tmp_path, monkeypatch):
    from fvdiffusion.rewards.image_rewards import Brightness

    seen = []

    def fake_aesthetic(mlp, clip, device=None):
        seen.append((mlp, clip))
        return Brightness()

    monkeypatch.setattr(t2i_rewards.model_rewards, "AestheticScore", fake_aesthetic)
    result = t2i(sd_dir, tmp_path / "out", "--reward-model", "mlp.safetensors", "--clip-model", "clip-dir",
                 prompts=prompts_file, reward="aesthetic")
    assert result.exit_code == 0, result.output
    assert seen == [("mlp.safetensors", "clip-dir")]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["clip_model"] == "clip-dir"


def test_t2i_a_csv_with_two_prompt_columns_is_refused(sd_dir, tmp_path, align_calls):
    csv = tmp_path / "two.csv"
    csv.write_text("Prompts,Category,Prompts\na cat,Animals,a dog\n")
    line = error_line(t2i(sd_dir, tmp_path / "out", prompts=csv))
    assert "2 'Prompts' columns" in line and "two.csv" in line and align_calls == []


def test_t2i_a_shard_record_with_a_negative_index_is_refused(sd_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert t2i(sd_dir, out, "--shard", "0/2", prompts=prompts_file).exit_code == 0
    shard = out / "metrics.shard-0-of-2.jsonl"
    record = json.loads(shard.read_text().splitlines()[0])
    record.update(index=-1, prompt="the sea at night")  # would index the last prompt
    shard.write_text(json.dumps(record) + "\n")
    line = error_line(t2i(sd_dir, out, "--merge", prompts=prompts_file))
    assert "metrics.shard-0-of-2.jsonl" in line and "index -1" in line


# --- item 10: converters check finiteness and bound what they load -------------------------------

from fvdiffusion.errors import ConversionError  # noqa: E402
from fvdiffusion.rewards import model_rewards  # noqa: E402

PREDICTOR = ((0, (1024, 768)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16)))


def predictor_state():
    torch.manual_seed(0)
    return {f"layers.{i}.{p}": torch.randn(shape if p == "weight" else shape[:1]) * 0.01
            for i, shape in PREDICTOR for p in ("weight", "bias")}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_convert_aesthetic_refuses_non_finite_weights(tmp_path, value):
    state = predictor_state()
    state["layers.2.weight"][3, 5] = value
    torch.save(state, tmp_path / "p.pth")
    with pytest.raises(ConversionError, match=r"layers\.2\.weight has 1 non-finite value"):
        model_rewards.convert_aesthetic(tmp_path / "p.pth", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_convert_aesthetic_refuses_a_small_file_that_expands_in_memory(tmp_path):
    state = predictor_state()
    wide = 300_000  # 1024 x 300,000 float32 = 1.2 GB once contiguous, from one stored value
    state["layers.0.weight"] = torch.zeros(1).expand(1024, wide)
    state["layers.0.bias"] = torch.zeros(1024)
    torch.save(state, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 1_000_000
    with pytest.raises(ConversionError, match="more than an aesthetic predictor holds"):
        model_rewards.convert_aesthetic(tmp_path / "bomb.pth", tmp_path / "a.safetensors")
    state["layers.0.weight"] = torch.zeros(1).expand(1024, 768)  # within the bound, but still a view of one value
    torch.save(state, tmp_path / "view.pth")
    with pytest.raises(ConversionError, match="claims 786,432 values but its storage holds 1"):
        model_rewards.convert_aesthetic(tmp_path / "view.pth", tmp_path / "a.safetensors")


def test_convert_aesthetic_bounds_the_file_before_unpickling(tmp_path, monkeypatch):
    torch.save(predictor_state(), tmp_path / "p.pth")
    monkeypatch.setattr(model_rewards, "MAX_CONVERT_BYTES", 100_000)
    loads = []
    monkeypatch.setattr(model_rewards.torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ConversionError, match="more than an aesthetic predictor"):
        model_rewards.convert_aesthetic(tmp_path / "p.pth", tmp_path / "a.safetensors")
    assert loads == []


def test_a_nan_safetensors_predictor_is_refused_by_aesthetic_score(tmp_path):
    from safetensors.torch import save_file

    state = predictor_state()
    state["layers.7.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        model_rewards.AestheticScore(tmp_path / "a.safetensors", tmp_path / "no-clip", download=False)


@pytest.mark.parametrize("arg, value, named", [("height", 0, "height"), ("width", -8, "width"),
                                               ("height", 16.5, "height"), ("guidance_scale", float("inf"),
                                                                            "guidance_scale"),
                                               ("guidance_scale", float("nan"), "guidance_scale")])
def test_sizes_and_guidance_the_pipeline_would_misread_are_one_line_before_any_model_runs(sd, arg, value, named):
    calls = sd.unet.forward
    with pytest.raises(ValueError) as info:
        align(sd, PROMPT, Brightness(), **{**SMALL, arg: value})
    line = str(info.value)
    assert "\n" not in line and line.startswith(named)
    assert sd.unet.forward == calls
