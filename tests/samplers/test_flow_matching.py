"""Flow-matching (rectified-flow) models in the engine, proven on the exact Gaussian-mixture testbed.

The velocity model of x_t = (1 − t) x0 + t ε is run in its VP view (FlowMatchingDenoiser): x̂0 must be
the exact posterior mean, DDIM(0) must be the flow's Euler step, plain sampling must reach the
exact-sample floor, and FVD / SMC must land on the exact tilted targets with the tolerances the VP
tests use (tests/core/test_exact_targets.py, same seeds, N and step count).
"""

import math

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion.denoisers.flow_matching import (
    ALPHA_BAR_FLOOR,
    FlowMatchingDenoiser,
    euler_step,
    flow_alpha_bar,
    flow_scale,
    flow_time_from_alpha_bar,
    shifted_flow_times,
    training_flow_times,
    vp_schedule_from_flow_times,
)
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.schedule import StepGrid, ddim_step, to_x0_eps
from fvdiffusion.testbeds import base_problem, toy_problem
from fvdiffusion.testbeds.flow import GaussianMixtureVelocity, flow_denoiser, flow_law, flow_posterior_mean_x0

N, STEPS = 1024, 50


def _sample(method, problem, seed, **opts):
    den = flow_denoiser(problem.mixture)
    return fv.sample(method, den, problem.reward, n_particles=N, num_steps=STEPS, seed=seed,
                     grid=den.step_grid(STEPS), **opts)


# ---------------------------------------------------------------- the VP view is exact


def test_alpha_bar_and_flow_time_are_inverse_and_the_table_is_a_vp_schedule():
    t = training_flow_times()
    a = flow_alpha_bar(t)
    assert float(a[-1]) == ALPHA_BAR_FLOOR and bool(torch.all(a[1:] < a[:-1]))
    torch.testing.assert_close(flow_time_from_alpha_bar(a[:-1]), t[:-1], rtol=0, atol=1e-12)
    # √ᾱ = (1 − t)/c, √(1 − ᾱ) = t/c: x̃ = x_t / c(t) is the VP state of the same x0 and ε
    c = flow_scale(t[:-1])
    torch.testing.assert_close(a[:-1].sqrt(), (1 - t[:-1]) / c, rtol=0, atol=1e-12)
    torch.testing.assert_close((1 - a[:-1]).sqrt(), t[:-1] / c, rtol=0, atol=1e-12)
    torch.testing.assert_close(vp_schedule_from_flow_times(t).alphas_cumprod, a)


@pytest.mark.parametrize("name", ["gmm2d-base", "gmm8d-base"])
@pytest.mark.parametrize("index", [0, 10, 250, 500, 900, 999])
def test_vp_view_x0_and_eps_are_the_exact_posterior_means(name, index):
    """x̂0 from the velocity equals E[x0 | x̃] of the VP mixture at ᾱ(t) (an independent route), and
    ε̂ = E[ε | x_t]; t = 1 (index 999) included, where ᾱ is clamped."""
    mixture = base_problem(name).mixture
    den = flow_denoiser(mixture)
    x = 1.5 * torch.randn(256, mixture.dim, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    a = den.schedule.alphas_cumprod[index]
    pred = to_x0_eps(den(x, torch.full((256,), index)), x, a, den.prediction_type)
    torch.testing.assert_close(pred.x0, mixture.posterior_mean_x0(x, a), rtol=0, atol=1e-6)
    t = float(den.flow_time(index))
    x_t = float(flow_scale(t)) * x
    eps_flow = (x_t - (1 - t) * flow_posterior_mean_x0(mixture, x_t, t)) / t
    torch.testing.assert_close(pred.eps, eps_flow, rtol=0, atol=1e-6)


def test_the_flow_law_is_the_vp_law_rescaled():
    mixture = toy_problem("gmm2d-component").mixture
    t = 0.37
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = float(flow_scale(t))
    vp = mixture.noised(float(flow_alpha_bar(t)))
    # p_flow(x_t) = p_vp(x_t / c) / c^D
    torch.testing.assert_close(flow_law(mixture, t).log_prob(x), vp.log_prob(x / c) - 2 * math.log(c))


@pytest.mark.parametrize("t_index,s_index", [(999, 979), (600, 400), (30, 9), (9, -1)])
def test_ddim_eta0_in_the_vp_view_is_the_euler_step_of_the_flow_ode(t_index, s_index):
    """c(s)·DDIM₀(x̃) = x_t + (s − t) v (float64, to round-off); landing on ᾱ = 1 gives x_t − t v.
    At t = 1 the clamp ᾱ = ALPHA_BAR_FLOOR adds an error of order √ᾱ_floor = 2⁻²⁵ (below float32's resolution)."""
    mixture = toy_problem("gmm8d-component").mixture
    den = flow_denoiser(mixture)
    velocity = GaussianMixtureVelocity(mixture)
    x_tilde = torch.randn(64, 8, generator=torch.Generator().manual_seed(t_index), dtype=torch.float64)
    t, s = float(den.flow_time(t_index)), float(den.flow_time(s_index))
    a_t = float(den.schedule.alpha_bar(t_index))
    a_s = float(den.schedule.alpha_bar(s_index))
    pred = to_x0_eps(den(x_tilde, torch.full((64,), t_index)), x_tilde, a_t, "v")
    x_s_tilde = ddim_step(pred.x0, pred.eps, a_t, a_s, 0.0, None)
    x_t = float(flow_scale(t)) * x_tilde
    expected = euler_step(x_t, velocity(x_t, torch.full((64,), t, dtype=torch.float64)), t, s)
    atol = 1e-10 if t < 1 else 4 * math.sqrt(ALPHA_BAR_FLOOR)
    torch.testing.assert_close(float(flow_scale(s)) * x_s_tilde, expected, rtol=0, atol=atol)


# ---------------------------------------------------------------- exact targets


@pytest.mark.parametrize("name", ["gmm2d-component", "gmm8d-component"])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_base_sampling_reaches_the_exact_floor(name, eta):
    """η = 1: the marginal-preserving SDE; η = 0: the flow's Euler ODE. Same bound as the VP test."""
    problem = base_problem(name)
    res = _sample("base", problem, seed=5, eta=eta)
    assert evaluate_against_target(res.samples, problem, seed=5).floor_ratio < 2.0


_BASE_W2: dict[str, float] = {}


def _base_w2(problem) -> float:
    if problem.name not in _BASE_W2:
        base = _sample("base", base_problem(problem.name), seed=11)
        _BASE_W2[problem.name] = evaluate_against_target(base.samples, problem, seed=11).sliced_w2
    return _BASE_W2[problem.name]


@pytest.mark.parametrize("name", ["gmm2d-component", "gmm8d-component"])
@pytest.mark.parametrize("method,opts", [("fvd", {}), ("smc", {}), ("fvd", {"eta": 0.0, "rebirth_noise": 1.0})])
def test_fvd_and_smc_land_on_the_target_component(name, method, opts):
    problem = toy_problem(name)
    report = evaluate_against_target(_sample(method, problem, seed=11, **opts).samples, problem, seed=11)
    assert report.mass_on_target >= 0.97
    assert report.floor_ratio < 6.0
    assert report.sliced_w2 < 0.2 * _base_w2(problem)


@pytest.mark.parametrize("method,opts", [("fvd", {}), ("smc", {"ess_threshold": 0.5})])
def test_linear_tilt_moves_the_mean_like_the_exact_target(method, opts):
    problem = toy_problem("gmm2d-linear")
    report = evaluate_against_target(_sample(method, problem, seed=3, **opts).samples, problem, seed=3)
    assert report.mean_error < 0.1
    assert report.floor_ratio < 4.0


@pytest.mark.parametrize("method", list(fv.METHODS))
def test_every_method_runs_on_a_flow_model(method):
    problem = toy_problem("gmm2d-component")
    den = flow_denoiser(problem.mixture)
    opts = {"n_rollouts": 8} if method.startswith("dts") else {}
    res = fv.sample(method, den, problem.reward, n_particles=8, num_steps=5, seed=0, grid=den.step_grid(5), **opts)
    assert res.samples.shape == (8, 2) and bool(torch.isfinite(res.samples).all())


# ---------------------------------------------------------------- the table, the grid, bad input


def test_step_grid_starts_at_pure_noise_and_lands_on_clean_data():
    den = flow_denoiser(toy_problem("gmm2d-component").mixture)
    grid = den.step_grid(50)
    assert grid[0].t == 999 and float(den.flow_time(grid[0].t)) == 1.0
    assert grid[-1].t == 0 and grid[-1].t_prev == -1 and grid[-1].alpha_bar_prev == 1.0
    times = [float(den.flow_time(s.t)) for s in grid]
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64),
                               torch.linspace(1.0, 0.001, 50, dtype=torch.float64), rtol=0, atol=5e-4)
    assert [s.t for s in den.step_grid()] == list(range(999, -1, -1))
    # a table of exactly K times: the engine's default grid walks it all, like step_grid(K)
    small = FlowMatchingDenoiser(den.velocity_fn, shifted_flow_times(8, shift=3.0), (2,))
    assert StepGrid.build(small.schedule, 8) == small.step_grid(8)
    assert small.index_of(small.flow_times).tolist() == list(range(8))
    # one step (a table needs two entries: the single time is stored twice)
    one = FlowMatchingDenoiser(den.velocity_fn, [1.0], (2,))
    for grid in (one.step_grid(1), StepGrid.build(one.schedule, 1)):
        assert len(grid) == 1 and float(one.flow_time(grid[0].t)) == 1.0 and grid[0].t_prev == -1


def test_shifted_times_match_the_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for shift, k in [(1.0, 50), (3.0, 28), (3.0, 1)]:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(k)
        torch.testing.assert_close(shifted_flow_times(k, shift), scheduler.sigmas[:-1].double().flip(0),
                                   rtol=0, atol=1e-7)  # diffusers rounds to float32


def test_clean_data_index_returns_x_without_calling_the_model():
    calls = []

    def velocity(x, t, cond):
        calls.append(t.clone())
        return torch.ones_like(x)

    den = FlowMatchingDenoiser(velocity, [0.25, 0.5, 1.0], (3,))
    x = torch.randn(4, 3, dtype=torch.float64)
    out = den(x, torch.tensor([-1, 0, 2, -1]))
    pred = to_x0_eps(out, x, den.schedule.alpha_bar(torch.tensor([-1, 0, 2, -1])), "v")
    torch.testing.assert_close(pred.x0[[0, 3]], x[[0, 3]])
    assert len(calls) == 1 and calls[0].tolist() == [0.25, 1.0]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"flow_times": [0.5, 0.4]}, ValueError, "strictly increasing"),
    ({"flow_times": [0.0, 0.5]}, ValueError, r"\(0, 1\]"),
    ({"flow_times": [0.5, 1.5]}, ValueError, r"\(0, 1\]"),
    ({"flow_times": []}, ValueError, "non-empty"),
    ({"flow_times": "abc"}, TypeError, "sequence of numbers"),
    ({"sample_shape": ()}, ValueError, "sample_shape"),
    ({"sample_shape": (2, 0)}, ValueError, "sample_shape"),
    ({"flow_times": [0.5, 1.0], "schedule": vp_schedule_from_flow_times([0.5, 1.0])}, ValueError, "not both"),
])
def test_bad_construction_fails_with_one_line(kwargs, error, match):
    args = {"flow_times": None, "sample_shape": (2,), **kwargs}
    with pytest.raises(error, match=match) as info:
        FlowMatchingDenoiser(lambda x, t, c: x, **args)
    assert "\n" not in str(info.value)


def test_bad_calls_fail_with_one_line():
    den = FlowMatchingDenoiser(lambda x, t, c: x[:, :1], [0.5, 1.0], (2,))
    for call, match in [
        (lambda: den(torch.zeros(3, 2), torch.tensor([0, 1, 2])), r"\[-1, 1\]"),
        (lambda: den(torch.zeros(3, 5), torch.tensor(0)), r"shape \[B, 2\]"),
        (lambda: den(torch.zeros(3, 2), torch.tensor(0)), "velocity_fn must return"),
        (lambda: den.index_of(0.7), "not in this denoiser's table"),
        (lambda: den.step_grid(3), r"\[1, 2\]"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="callable"):
        FlowMatchingDenoiser(None, [0.5, 1.0], (2,))
