"""align(): one call from a real (tiny, random) diffusers pipeline to ranked images, via the engine."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

import fvdiffusion  # noqa: E402
from fvdiffusion.integrations.diffusers import AlignResult, UnsupportedPipelineError, align  # noqa: E402
from fvdiffusion.rewards.image_rewards import Brightness  # noqa: E402

PROMPT = "a photo of the sea"


@pytest.fixture(scope="module")
def sd():
    return tiny_diffusers.sd_pipeline()


@pytest.fixture(scope="module")
def ddpm():
    return tiny_diffusers.ddpm_pipeline()


def run(pipe, prompt, **kwargs) -> AlignResult:
    options = dict(method="fvd", n_particles=6, num_inference_steps=4, seed=0)
    if prompt is not None:  # an unconditional pipeline takes no guidance
        options["guidance_scale"] = 2.0
    options.update(kwargs)
    return align(pipe, prompt, Brightness(), **options)


def test_sd_align_returns_ranked_pil_images_and_counts_decodes(sd):
    out = run(sd, PROMPT)
    assert len(out.images) == 6 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)
    assert out.result.samples.shape == (6, 4, 8, 8)
    assert torch.all(out.rewards[:-1] >= out.rewards[1:])
    torch.testing.assert_close(out.rewards, out.result.rewards[out.ranking])
    # the best image is the decoded best latent, and its brightness is its reward
    best = np.asarray(out.images[0], dtype=np.float64).mean() / 255
    assert abs(best - float(out.rewards[0])) < 1 / 255
    # every x̂0 reward evaluation decoded one latent, plus the final decode of the N images
    assert out.result.cost.extra["vae_decodes"] == out.result.cost.reward_calls + 6
    assert out.result.cost.denoiser_calls == 6 * 4


def test_callback_sees_every_step_of_the_latents_and_changes_nothing(sd):
    seen = []
    out = run(sd, PROMPT, callback=lambda event: seen.append((event.info.k, tuple(event.state.x.shape))))
    assert seen == [(k, (6, 4, 8, 8)) for k in (4, 3, 2, 1)]
    assert torch.equal(out.result.samples, run(sd, PROMPT).result.samples)


def test_unconditional_pixel_pipeline(ddpm):
    out = run(ddpm, None, n_particles=4)
    assert len(out.images) == 4 and out.images[0].size == (8, 8)
    assert out.result.samples.shape == (4, 3, 8, 8)
    assert "vae_decodes" not in out.result.cost.extra


def test_same_seed_same_result_other_seed_other_result(sd):
    a, b, c = run(sd, PROMPT), run(sd, PROMPT), run(sd, PROMPT, seed=1)
    assert torch.equal(a.result.samples, b.result.samples) and torch.equal(a.rewards, b.rewards)
    assert not torch.allclose(a.result.samples, c.result.samples)


@pytest.mark.parametrize("method", ["fvd", "smc"])
def test_micro_batching_does_not_change_results(sd, method):
    whole = run(sd, PROMPT, method=method, lam=50.0)
    chunked = run(sd, PROMPT, method=method, lam=50.0, batch_size=2)
    torch.testing.assert_close(chunked.result.samples, whole.result.samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.result.rewards, whole.result.rewards, rtol=1e-5, atol=1e-7)
    assert torch.equal(chunked.ranking, whole.ranking)
    assert [p.tolist() for p in chunked.result.lineage.parents] == [p.tolist() for p in whole.result.lineage.parents]


def test_fvd_raises_an_offline_reward_over_base(sd):
    # brightness of the decoded image has a clear spread even on a random model; λ = 100
    # makes the tilt visible with 16 particles (measured: +1.0 to +1.6 base std over 3 seeds)
    base = run(sd, PROMPT, method="base", n_particles=16, num_inference_steps=8)
    fvd = run(sd, PROMPT, method="fvd", n_particles=16, num_inference_steps=8, lam=100.0)
    spread = base.rewards.std()
    assert fvd.rewards.mean() > base.rewards.mean() + 0.5 * spread
    assert any(s.selected for s in fvd.result.trace)


def test_ddim_eta0_rebirth_noise_keeps_samples_distinct(sd):
    # deterministic DDIM: a plain clone follows its parent for ever; rebirth noise gives it its own path.
    # final_selection is off so that only the in-loop rebirths are compared.
    options = dict(method="fvd", n_particles=8, num_inference_steps=6, lam=100.0, eta=0.0, final_selection=False)
    cloned = run(sd, PROMPT, rebirth_noise=0.0, **options)
    reborn = run(sd, PROMPT, rebirth_noise=1.0, **options)
    assert sum(s.dead_fraction for s in cloned.result.trace) > 0  # selection did kill particles
    assert sum(s.dead_fraction for s in reborn.result.trace) > 0
    assert torch.unique(cloned.result.samples, dim=0).shape[0] < 8  # exact duplicates
    assert torch.unique(reborn.result.samples, dim=0).shape[0] == 8


def test_every_engine_method_runs_through_align(sd):
    for method in fvdiffusion.METHODS:
        out = run(sd, PROMPT, method=method, n_particles=4, num_inference_steps=3)
        assert len(out.images) == 4, method
        assert out.result.config["method"] == method
        assert torch.isfinite(out.rewards).all(), method


def test_clear_errors_for_misuse(sd, ddpm):
    with pytest.raises(ValueError, match="pass the prompt"):
        run(sd, None)
    with pytest.raises(ValueError, match="unconditional"):
        run(ddpm, PROMPT)
    with pytest.raises(UnsupportedPipelineError, match="not supported"):
        run(object(), PROMPT)
    with pytest.raises(fvdiffusion.ConfigError, match="rebirth_nois"):
        run(sd, PROMPT, rebirth_nois=0.5)
