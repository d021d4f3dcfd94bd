"""The shipped MNIST DDPM exported as a diffusers DDPMPipeline (issue 12 item 5).

Measured (CPU, 64 random (x, t) with t in [0, 1000) including 0 and 999): the converted
UNet2DModel's eps differs from the zoo UNet's by at most 5.9e-5 in float32 (|eps| up to 11;
the SiLU fold's biases b - W c are rounded to float32, while the zoo's own float32-vs-float64
roundoff is 3.4e-6) and by 1.9e-11 in float64 (the fold is exact: silu(y) = y to 3e-12 for
y >= 30). Without the fold the error is 1.6. The DDPMScheduler's ᾱ (float32) match
VPSchedule.linear(1000) to 2.5e-7. Through align() with a DDIMScheduler, 10 steps, N=32 from
the same x_init: base (eta=0) samples agree with the native engine's to 2.5e-4, FVD (eta=1,
classifier reward for class 3) to 7.3e-5 with identical selections; class-3 accuracy 0.19
(base) -> 0.97 (FVD) in both, mean log p(3|x) -13.79 -> -0.052 in both.
"""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fvdiffusion  # noqa: E402
import fvdiffusion.zoo.unet as zoo_unet  # noqa: E402
from fvdiffusion.cli import main  # noqa: E402
from fvdiffusion.integrations.diffusers.export_mnist import (  # noqa: E402
    DigitImageReward, ddpm_scheduler, export_ddpm_pipeline, zoo_unet_to_unet2d,
)
from fvdiffusion.integrations.diffusers.timesteps import scheduler_grid  # noqa: E402
from fvdiffusion.rewards.classifier import ClassifierReward  # noqa: E402
from fvdiffusion.schedule import VPSchedule  # noqa: E402
from fvdiffusion.zoo.loaders import load_ddpm, load_module, load_reward_classifier  # noqa: E402

N, K, TARGET = 32, 10, 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo():
    return load_module("ddpm")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[0], t[1] = 0, 999
    return x, t


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = export_ddpm_pipeline(tmp_path_factory.mktemp("ddpm") / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def classifier_reward():
    return ClassifierReward(load_reward_classifier(), TARGET)


def test_converted_unet_matches_the_zoo_unet_in_float32(zoo, inputs):
    x, t = inputs
    model = zoo_unet_to_unet2d(zoo)
    with torch.no_grad():
        err = (zoo(x, t) - model(x, t).sample).abs().max().item()
    assert err < 2e-4  # measured 5.9e-5 (float32-rounded folded biases)


def test_conversion_is_exact_in_float64(zoo, inputs, monkeypatch):
    x, t = inputs
    model = zoo_unet_to_unet2d(zoo, dtype=torch.float64)
    # both compute the sinusoid in float32; the zoo's MLP then needs it in float64 (diffusers casts it)
    embed = zoo_unet.timestep_embedding
    monkeypatch.setattr(zoo_unet, "timestep_embedding", lambda tt, dim: embed(tt, dim).double())
    zoo64 = copy.deepcopy(zoo).double()
    with torch.no_grad():
        err = (zoo64(x.double(), t) - model(x.double(), t).sample).abs().max().item()
    assert err < 1e-9  # measured 1.9e-11


def test_without_the_silu_fold_the_outputs_differ(zoo, inputs):
    x, t = inputs
    with torch.no_grad():
        err = (zoo(x, t) - zoo_unet_to_unet2d(zoo, fold_silu=False)(x, t).sample).abs().max().item()
    assert err > 0.1  # measured 1.6


def test_scheduler_is_the_zoo_schedule():
    scheduler = ddpm_scheduler()
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False
    err = (scheduler.alphas_cumprod.double() - VPSchedule.linear(1000).alphas_cumprod).abs().max().item()
    assert err < 1e-6  # float32 ᾱ; measured 2.5e-7
    torch.testing.assert_close(load_ddpm().schedule.alphas_cumprod, VPSchedule.linear(1000).alphas_cumprod)


def _both(pipe, reward, method, eta):
    native = load_ddpm()
    x = torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grid = scheduler_grid(pipe.scheduler, K, native.schedule).grid
    aligned = fvdiffusion.align(pipe, None, DigitImageReward(reward), method=method, eta=eta, latents=x,
                                num_inference_steps=K, n_particles=N, output_type="latent", seed=0).result
    direct = fvdiffusion.sample(method, native, reward, n_particles=N, num_steps=K, eta=eta, grid=grid,
                                x_init=x, seed=0)
    return aligned, direct


def _accuracy(reward, samples):
    return (reward.classifier(samples.clamp(-1, 1)).argmax(1) == TARGET).float().mean().item()


def test_exported_pipeline_through_align_samples_as_the_native_engine(pipe, classifier_reward):
    assert pipe.unet.config.sample_size == 28 and pipe.unet.dtype == torch.float32
    aligned, direct = _both(pipe, classifier_reward, "base", 0.0)
    torch.testing.assert_close(aligned.samples, direct.samples, atol=2e-3, rtol=0)  # measured 2.5e-4
    # the pixel adapter's [0, 1] images mapped back give the classifier reward of the clamped x̂0
    torch.testing.assert_close(aligned.rewards, classifier_reward(aligned.samples).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(aligned.rewards, direct.rewards, atol=1e-3, rtol=1e-4)


def test_fvd_with_the_classifier_reward_gains_as_natively(pipe, classifier_reward):
    base_a, base_n = _both(pipe, classifier_reward, "base", 0.0)
    fvd_a, fvd_n = _both(pipe, classifier_reward, "fvd", 1.0)
    gain_a = fvd_a.rewards.mean().item() - base_a.rewards.mean().item()
    gain_n = fvd_n.rewards.mean().item() - base_n.rewards.mean().item()
    assert gain_a > 5 and abs(gain_a - gain_n) < 1e-3  # measured 13.74 both
    acc = [_accuracy(classifier_reward, r.samples) for r in (base_a, base_n, fvd_a, fvd_n)]
    assert acc[0] == acc[1] and acc[2] == acc[3] and acc[2] >= acc[0] + 0.5, acc  # measured 0.19 -> 0.97


def test_cli_writes_a_safetensors_pipeline_folder(tmp_path, capsys):
    out = tmp_path / "mnist-ddpm"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "diffusers-ddpm", "--out", str(out)])
    assert exit_info.value.code == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and (out / "scheduler" / "scheduler_config.json").is_file()
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"


def test_cli_bad_out_is_one_line(tmp_path, capsys):
    bad = tmp_path / "file"
    bad.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "diffusers-ddpm", "--out", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err
