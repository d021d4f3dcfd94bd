"""Adversarial models and rewards through ``fvdiffusion.sample`` (issue 21): what a user's own
reward or denoiser returns is converted as they would expect or refused in one line naming it;
the engine's own state is never changed by what it hands out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fvdiffusion as fv
from fvdiffusion.errors import RewardError
from fvdiffusion.rewards.composite import WeightedSum

SIZE = dict(n_particles=6, num_steps=3, seed=0)
POPULATION_METHODS = ["base", "bon", "smc", "vasr", "fvd"]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --- item 2: reward returns and prompts ---------------------------------------------------------

@pytest.mark.parametrize("method", POPULATION_METHODS)
@pytest.mark.parametrize("form", ["list", "numpy", "numpy_float32", "tuple_of_ints"])
def test_list_and_numpy_reward_returns_are_converted(gmm2d, method, form):
    problem, den = gmm2d

    def converted(x, cond=None):
        values = problem.reward(x, cond)
        if form == "list":
            return values.tolist()
        if form == "numpy":
            return values.numpy()
        if form == "numpy_float32":
            return values.float().numpy()
        return tuple(int(v > 0) for v in values.tolist())

    def exact(x, cond=None):
        values = problem.reward(x, cond)
        if form == "numpy_float32":
            return values.float().double()
        return (values > 0).double() if form == "tuple_of_ints" else values

    got = fv.sample(method, den, converted, lam=problem.lam, **SIZE)
    want = fv.sample(method, den, exact, lam=problem.lam, **SIZE)
    assert torch.equal(got.samples, want.samples) and torch.equal(got.rewards, want.rewards)


def named_reward(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("returned, needle", [
    (lambda x: x.sum(), "returned one number (a 0-d tensor) for 6 images"),
    (lambda x: x[:, 0].tolist()[:-1], "returned shape (5,)"),
    (lambda x: ["a"] * x.shape[0], "returned a list that is not numbers"),
    (lambda x: {"r": x[:, 0]}, "returned dict"),
    (lambda x: np.ones(x.shape[0], dtype=bool), "returned a ndarray of torch.bool"),
    (lambda x: x[:, 0].long(), "returned dtype torch.int64"),
    (lambda x: x[:, :1], "returned shape (6, 1)"),
])
def test_bad_reward_returns_are_one_line_naming_the_reward_and_the_shape(gmm2d, returned, needle):
    problem, den = gmm2d
    reward = named_reward(lambda x, cond=None: returned(x), "my_reward")
    with pytest.raises(RewardError) as info:
        fv.sample("fvd", den, reward, lam=1.0, batch_size=None, **SIZE)
    line = one_line(info.value)
    assert "reward 'my_reward'" in line and needle in line and "expected a float tensor of shape (6,)" in line


def test_a_zero_d_return_for_one_image_is_that_image_s_reward(gmm2d):
    problem, den = gmm2d
    scalar = fv.sample("fvd", den, lambda x, cond=None: problem.reward(x, cond).squeeze(), lam=problem.lam,
                       batch_size=1, **SIZE)
    plain = fv.sample("fvd", den, problem.reward, lam=problem.lam, batch_size=1, **SIZE)
    assert torch.equal(scalar.samples, plain.samples)


def test_a_reward_taking_prompts_gets_one_prompt_per_image(gmm2d):
    problem, den = gmm2d
    seen = []

    def das_style(x, prompts):  # DAS's reward(images, prompts): prompts[i] belongs to x[i]
        seen.append(list(prompts))
        return problem.reward(x)

    class Declared:
        prompts_as_list = True

        def __call__(self, x, cond=None):
            seen.append(cond)
            return problem.reward(x)

    fv.sample("fvd", den, das_style, cond="a cat", lam=1.0, batch_size=4, **SIZE)
    assert seen and all(p == ["a cat"] * len(p) and len(p) in (4, 2) for p in seen), seen
    seen.clear()
    fv.sample("fvd", den, Declared(), cond="a dog", lam=1.0, **SIZE)
    assert seen and all(p == ["a dog"] * 6 for p in seen)
    seen.clear()
    fv.sample("fvd", den, lambda x, cond=None: seen.append(cond) or problem.reward(x), cond="a cow", **SIZE)
    assert seen and all(p == "a cow" for p in seen)  # a reward that did not ask keeps the string


def test_weighted_sum_is_the_sum_of_its_terms_times_their_weights(gmm2d):
    problem, den = gmm2d
    first = named_reward(lambda x, cond=None: problem.reward(x, cond), "posterior")
    second = named_reward(lambda x, cond=None: x[:, 0].numpy(), "first_coordinate")  # numpy, converted per term
    combined = WeightedSum({"posterior": (first, 2.0), "x": (second, -0.5)})
    manual = named_reward(lambda x, cond=None: 2.0 * problem.reward(x, cond).double() - 0.5 * x[:, 0].double(), "m")
    got = fv.sample("fvd", den, combined, lam=1.0, **SIZE)
    want = fv.sample("fvd", den, manual, lam=1.0, **SIZE)
    torch.testing.assert_close(got.rewards, want.rewards, rtol=0, atol=1e-12)
    assert torch.equal(got.samples, want.samples)
    assert set(combined.last_terms) == {"posterior", "x"} and combined.name == "2·posterior + -0.5·x"


@pytest.mark.parametrize("terms, needle", [
    ([], "at least one"), ([(lambda x: x, "one")], "must be a finite number"),
    ([(lambda x: x, float("nan"))], "must be a finite number"), ([("clip", 1.0)], "is not callable"),
    ([lambda x: x], "(reward, weight) pair"),
])
def test_weighted_sum_refuses_bad_terms_in_one_line(terms, needle):
    with pytest.raises((ValueError, TypeError)) as info:
        WeightedSum(terms)
    assert needle in one_line(info.value)


def test_a_bad_term_is_named_in_the_error(gmm2d):
    problem, den = gmm2d
    combined = WeightedSum({"ok": (problem.reward, 1.0), "broken": (lambda x, cond=None: x.sum(), 1.0)})
    with pytest.raises(RewardError) as info:
        fv.sample("fvd", den, combined, lam=1.0, **SIZE)
    assert "term 'broken' of the weighted sum" in one_line(info.value)


# --- item 10: one step, one particle --------------------------------------------------------------

@pytest.mark.parametrize("method", list(fv.METHODS))
@pytest.mark.parametrize("n, k", [(1, 1), (4, 1), (1, 3)])
def test_every_method_runs_with_one_step_and_with_one_particle(gmm2d, method, n, k):
    problem, den = gmm2d
    result = fv.sample(method, den, problem.reward, lam=problem.lam, n_particles=n, num_steps=k, seed=0)
    assert result.samples.shape == (n, 2) and bool(torch.isfinite(result.samples).all())
    assert result.rewards.shape == (n,)


# --- item 9: the engine defends its own state -----------------------------------------------------

from fvdiffusion.errors import DenoiserError  # noqa: E402


class Wrapped:
    """The toy denoiser with its output passed through ``change`` (and optionally its input mutated)."""

    def __init__(self, inner, change=lambda out, x: out, mutate=False):
        self.inner, self.change, self.mutate = inner, change, mutate
        self.schedule, self.prediction_type, self.sample_shape = inner.schedule, inner.prediction_type, inner.sample_shape

    def __call__(self, x, t, cond=None):
        out = self.inner(x, t, cond)
        if self.mutate:
            x.mul_(0)
        return self.change(out, x)


@pytest.mark.parametrize("method", list(fv.METHODS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_non_real_floating_denoiser_output_is_one_line(gmm2d, method, dtype):
    problem, den = gmm2d
    bad = Wrapped(den, lambda out, x: out.to(dtype))
    with pytest.raises(DenoiserError) as info:
        fv.sample(method, bad, problem.reward, lam=problem.lam, **SIZE)
    assert f"denoiser returned dtype {dtype}" in one_line(info.value)


@pytest.mark.parametrize("method", list(fv.METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_floating_outputs_run_in_the_population_s_dtype(gmm2d, method, dtype):
    problem, den = gmm2d
    result = fv.sample(method, Wrapped(den, lambda out, x: out.to(dtype)), problem.reward, lam=problem.lam, **SIZE)
    assert result.samples.dtype == torch.float32 and bool(torch.isfinite(result.samples).all())


def test_a_meta_device_output_is_one_line_naming_the_device(gmm2d):
    problem, den = gmm2d
    with pytest.raises(DenoiserError) as info:
        fv.sample("fvd", Wrapped(den, lambda out, x: out.to("meta")), problem.reward, **SIZE)
    assert "on meta" in one_line(info.value) and "population's device, cpu" in one_line(info.value)
    with pytest.raises(RewardError) as info:
        fv.sample("fvd", den, lambda x, cond=None: problem.reward(x).to("meta"), **SIZE)
    assert "meta device" in one_line(info.value)


@pytest.mark.parametrize("method", POPULATION_METHODS)
def test_no_autograd_graph_is_kept_when_the_denoiser_output_requires_grad(gmm2d, method):
    problem, den = gmm2d
    weight = torch.ones((), requires_grad=True)
    seen = []

    def with_grad(out, x):
        with torch.enable_grad():  # a model that turns autograd on inside its forward
            return out * weight

    result = fv.sample(method, Wrapped(den, with_grad), problem.reward, lam=problem.lam,
                       callback=lambda event: seen.append(event.state.x.requires_grad), **SIZE)
    assert not result.samples.requires_grad and not any(seen)


@pytest.mark.parametrize("method", list(fv.METHODS))
def test_models_that_write_into_their_inputs_do_not_change_the_run(gmm2d, method):
    problem, den = gmm2d

    def scribbling_reward(x, cond=None):
        r = problem.reward(x, cond)
        x.fill_(1e6)
        return r

    plain = fv.sample(method, den, problem.reward, lam=problem.lam, **SIZE)
    mutated = fv.sample(method, Wrapped(den, mutate=True), scribbling_reward, lam=problem.lam, **SIZE)
    assert torch.equal(plain.samples, mutated.samples) and torch.equal(plain.rewards, mutated.rewards)


def test_config_beside_conflicting_keywords_or_options_is_refused(gmm2d):
    from fvdiffusion.samplers import make_config

    problem, den = gmm2d
    config = make_config("fvd", n_particles=6, num_steps=3, lam=2.0)
    with pytest.raises(TypeError) as info:
        fv.sample("fvd", den, problem.reward, config=config, n_particles=16)
    assert "n_particles=16 (config has 6)" in one_line(info.value)
    with pytest.raises(TypeError) as info:
        fv.sample("fvd", den, problem.reward, config=config, rebirth_nosie=0.5)  # misspelt
    assert "method option(s) rebirth_nosie" in one_line(info.value)
    # keywords equal to the config (or left at their defaults) are fine
    fv.sample("fvd", den, problem.reward, config=config, lam=2.0)


# --- item 7: FK steering's potential names --------------------------------------------------------

from fvdiffusion import potentials  # noqa: E402
from fvdiffusion.denoisers.gaussian_mixture import mixture_cov, mixture_mean  # noqa: E402
from fvdiffusion.schedule import VPSchedule  # noqa: E402
from fvdiffusion.testbeds import toy_problem  # noqa: E402


def test_fk_steering_s_add_is_our_running_sum_and_recorded_as_sum(gmm2d):
    problem, den = gmm2d
    add = fv.sample("smc", den, problem.reward, lam=problem.lam, potential="add", **SIZE)
    total = fv.sample("smc", den, problem.reward, lam=problem.lam, potential="sum", **SIZE)
    assert torch.equal(add.samples, total.samples) and torch.equal(add.log_weights, total.log_weights)
    assert add.config["potential"] == "sum"


def test_rt_increments_are_the_current_reward_alone():
    rewards = [torch.tensor([1.0, -2.0]).double(), torch.tensor([3.0, -1.0]).double()]
    aux: dict = {}
    for r in rewards:
        inc = potentials.smc_increment("rt", 0.7, aux, r)
        assert torch.equal(inc.log_g, 0.7 * r)
        aux.update(inc.carried)


def test_smc_with_rt_weights_hit_the_exact_linear_tilt():
    """FK steering's "rt" (G = exp(λ r_k), no memory) is exact here because the final correction
    removes what the lineage paid; without it the weighted mean misses the tilt."""
    problem = toy_problem("gmm2d-linear")
    res = fv.sample("smc", problem.denoiser(VPSchedule.linear(1000)), problem.reward, lam=problem.lam,
                    n_particles=4096, num_steps=20, seed=11, potential="rt", final_selection=False,
                    selection_start=0.0, selection_interval=4)
    w = res.log_weights.exp()
    mean = (w[:, None] * res.samples.double()).sum(0)
    exact = mixture_mean(problem.target).double()
    std = mixture_cov(problem.target).diagonal().sqrt().double()
    tolerance = 6 * std / (1.0 / (w * w).sum()).sqrt() + 0.08 * std
    assert ((mean - exact).abs() <= tolerance).all(), (mean.tolist(), exact.tolist())


def test_an_unknown_smc_potential_is_one_line_listing_the_names(gmm2d):
    problem, den = gmm2d
    with pytest.raises(Exception) as info:
        fv.sample("smc", den, problem.reward, potential="level", **SIZE)
    assert "potential" in one_line(info.value) and "diff, max, sum, rt" in one_line(info.value)


def test_a_callback_that_cannot_be_called_or_would_be_ignored_is_refused_in_one_line():
    import re

    import fvdiffusion as fv
    from fvdiffusion.testbeds import toy_problem
    from fvdiffusion.schedule import VPSchedule

    problem = toy_problem("gmm2d-component")
    den = problem.denoiser(VPSchedule.linear(1000))
    with pytest.raises(TypeError, match="callback: expected a callable"):
        fv.sample("fvd", den, problem.reward, n_particles=4, num_steps=2, callback=42)
    for method in ("dts", "dts*"):
        with pytest.raises(ValueError, match=re.escape(f"callback: {method} grows a search tree")):
            fv.sample(method, den, problem.reward, n_particles=4, num_steps=2, callback=lambda event: None)
    seen = []
    fv.sample("fvd", den, problem.reward, n_particles=4, num_steps=2, callback=seen.append)
    assert len(seen) == 2


@pytest.mark.parametrize("attribute, value, named", [("schedule", None, "denoiser.schedule"),
                                                     ("prediction_type", "epsilon", "denoiser.prediction_type"),
                                                     ("sample_shape", (2, 0), "denoiser.sample_shape")])
def test_a_denoiser_missing_its_contract_is_one_line_naming_the_attribute(attribute, value, named):
    from fvdiffusion.schedule import VPSchedule

    class Tiny:
        schedule = VPSchedule.linear(1000)
        prediction_type = "eps"
        sample_shape = (2,)

        def __call__(self, x, t, cond=None):
            return torch.zeros_like(x)

    den = Tiny()
    setattr(den, attribute, value)
    with pytest.raises((TypeError, ValueError)) as info:
        fv.sample("fvd", den, lambda x, c=None: x.sum(-1), n_particles=4, num_steps=2)
    assert str(info.value).startswith(named) and "\n" not in str(info.value)
