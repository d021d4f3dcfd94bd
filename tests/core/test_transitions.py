"""The transition contract: every way particles move between grid points, against exact identities and targets.

* DDIM(η) is the engine's historical step bit for bit (the golden engine outputs cover the runs);
  DDPM's posterior form equals DDIM(1), Euler equals DDIM(0) and Euler-ancestral equals DDIM(1),
  all in exact arithmetic (float64 here), with the same noise.
* Every transition samples the exact Gaussian-mixture law at 50 steps; DPM-Solver++(2M) and UniPC
  do so at 20 steps (their point: fewer denoiser calls).
* Switch sensitivity: the transition, its η and the x̂0 processing each change a run.
* History: a multistep solver's memory moves with clones (gather), restarts for a clone whose x_t
  was re-noised, and is kept for an exact clone.
"""

import math

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion import selection
from fvdiffusion.config import TRANSITIONS, CommonConfig, ConfigError
from fvdiffusion.loop import RunContext
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.population import initial_state
from fvdiffusion.samplers.fvd import FVDConfig, FVDKernel
from fvdiffusion.schedule import Prediction, StepGrid, VPSchedule, ddim_step
from fvdiffusion.testbeds import toy_problem
from fvdiffusion.transitions import ORDER, PREVIOUS_X0, SECOND_X0, make_transition

SCHEDULE = VPSchedule.linear(1000)


def _point(seed=0, n=5, d=3):
    gen = torch.Generator().manual_seed(seed)
    x0, eps, noise = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    return x0, eps, noise


def _grid(k=8):
    return StepGrid.build(SCHEDULE, k)


@pytest.mark.parametrize("index", [0, 3, 7])
@pytest.mark.parametrize("name, eta, same_as_eta", [("ddpm", 1.0, 1.0), ("euler", 0.0, 0.0), ("euler", 1.0, 1.0),
                                                    ("euler", 0.4, 0.4)])
def test_the_one_step_transitions_equal_ddim_in_exact_arithmetic(name, eta, same_as_eta, index):
    grid = _grid()
    info = grid[index]
    x0, eps, noise = _point(index)
    x = math.sqrt(info.alpha_bar) * x0 + math.sqrt(1 - info.alpha_bar) * eps
    moved = make_transition(CommonConfig(num_steps=8, eta=eta, transition=name), grid).step(
        info, x, Prediction(x0=x0, eps=eps), {}, noise)
    # Euler-ancestral's σ_up (k-diffusion's η) is DDIM(η)'s noise in σ units, σ_down its direction
    expected = ddim_step(x0, eps, info.alpha_bar, info.alpha_bar_prev, same_as_eta, noise)
    torch.testing.assert_close(moved.x, expected, rtol=1e-10, atol=1e-10)


def test_ddim_transition_is_ddim_step_bit_for_bit():
    grid = _grid()
    x0, eps, noise = (t.float() for t in _point(1))
    for eta in (0.0, 0.3, 1.0):
        transition = make_transition(CommonConfig(num_steps=8, eta=eta), grid)
        for info in grid:
            got = transition.step(info, x0, Prediction(x0=x0, eps=eps), {}, noise).x
            assert torch.equal(got, ddim_step(x0, eps, info.alpha_bar, info.alpha_bar_prev, eta, noise))


@pytest.mark.parametrize("transition, eta, steps", [("ddim", 0.0, 50), ("ddim", 1.0, 50), ("ddpm", 1.0, 50),
                                                    ("euler", 0.0, 50), ("euler", 1.0, 50), ("dpmpp_2m", 0.0, 20),
                                                    ("dpmpp_2m", 1.0, 50), ("unipc", 0.0, 20)])
def test_every_transition_samples_the_exact_mixture(transition, eta, steps):
    problem = toy_problem("gmm2d-base")
    res = fv.sample("base", problem.denoiser(SCHEDULE), None, n_particles=2048, num_steps=steps, seed=4, eta=eta,
                    transition=transition)
    report = evaluate_against_target(res.samples, problem, seed=4)
    reference = problem.mixture.sample(2048, torch.Generator().manual_seed(9))
    floor = evaluate_against_target(reference, problem, seed=4).sliced_w2  # two exact samples' distance
    assert report.sliced_w2 < 3 * floor + 0.02, (report.sliced_w2, floor)


def test_dpm_solver_is_closer_to_the_ode_solution_than_ddim_for_the_same_calls():
    """The multistep solver's point: the same probability-flow ODE with less discretisation error.

    One Gaussian, an exact denoiser, the same x_T: DDIM at 1000 steps is the reference solution; on
    the same 20-step grid (from t = 999, as diffusers' "trailing"/"linspace" grids start)
    DPM-Solver++(2M) lands much closer to it than DDIM (measured: 0.03 against 0.08)."""
    import numpy as np

    from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture, GaussianMixtureDenoiser

    mixture = GaussianMixture(torch.tensor([1.0]), torch.tensor([[1.0, -0.5]]),
                              torch.tensor([[[0.3, 0.1], [0.1, 0.2]]]))
    denoiser = GaussianMixtureDenoiser(mixture, SCHEDULE)
    x_t = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    reference = fv.sample("base", denoiser, None, n_particles=256, num_steps=1000, eta=0.0, x_init=x_t).samples
    # diffusers' "linspace" grid for DPM-Solver: 999 ... 50, then onto clean data
    grid = StepGrid.from_timesteps(SCHEDULE, np.linspace(0, 999, 21).round()[::-1][:-1].astype(int).tolist())
    error = {name: float((fv.sample("base", denoiser, None, n_particles=256, num_steps=20, eta=0.0, transition=name,
                                    x_init=x_t, grid=grid).samples - reference).norm(dim=1).mean())
             for name in ("ddim", "dpmpp_2m", "unipc")}
    assert error["dpmpp_2m"] < 0.6 * error["ddim"], error
    assert error["unipc"] < 0.6 * error["ddim"], error


@pytest.mark.parametrize("option, baseline", [
    (dict(transition="dpmpp_2m", eta=0.0), dict(eta=0.0)),
    (dict(transition="dpmpp_2m", eta=0.5), dict(transition="dpmpp_2m", eta=0.0)),
    (dict(transition="ddpm", clip_x0=0.3), dict(transition="ddpm")),
    (dict(eta=0.0, clip_x0=0.3), dict(eta=0.0)),
    (dict(eta=0.0, dynamic_threshold=0.5), dict(eta=0.0)),
    (dict(transition="dpmpp_2m", eta=0.0, dynamic_threshold=0.5), dict(transition="dpmpp_2m", eta=0.0)),
    (dict(transition="unipc", eta=0.0), dict(transition="dpmpp_2m", eta=0.0)),
    (dict(transition="unipc", eta=0.0, dynamic_threshold=0.5), dict(transition="unipc", eta=0.0)),
])
@pytest.mark.parametrize("method", ["base", "smc", "fvd", "vasr"])
def test_every_transition_option_changes_a_run(method, option, baseline):
    problem = toy_problem("gmm2d-linear")

    def run(**extra):
        return fv.sample(method, problem.denoiser(SCHEDULE), problem.reward, lam=problem.lam, n_particles=32,
                         num_steps=6, seed=2, **extra).samples

    assert not torch.allclose(run(**option), run(**baseline)), f"{option} did not change {method}"


@pytest.mark.parametrize("method", ["svdd", "dts"])
def test_search_methods_move_through_the_run_transition(method):
    problem = toy_problem("gmm2d-linear")

    def run(**extra):
        options = dict(n_candidates=2) if method == "svdd" else dict(n_rollouts=8)
        return fv.sample(method, problem.denoiser(SCHEDULE), problem.reward, lam=problem.lam, n_particles=4,
                         num_steps=4, seed=2, **options, **extra).samples

    assert not torch.allclose(run(eta=0.5), run(eta=1.0))
    assert not torch.allclose(run(transition="ddpm", clip_x0=0.2), run(transition="ddpm"))


def test_transition_fields_are_validated_in_one_line():
    with pytest.raises(ConfigError, match="transition"):
        CommonConfig(transition="dpm")
    with pytest.raises(ConfigError, match="eta"):
        CommonConfig(transition="ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="dynamic_threshold"):
        CommonConfig(dynamic_threshold=1.5)
    with pytest.raises(ConfigError, match="eta=1.0: expected 0 for transition='unipc'"):
        CommonConfig(transition="unipc", eta=1.0)
    with pytest.raises(ConfigError, match="dts"):
        fv.make_config("dts", transition="dpmpp_2m")
    assert set(TRANSITIONS) == {"ddim", "ddpm", "euler", "dpmpp_2m", "unipc"}


def test_defaults_stay_out_of_the_stored_config_dict():
    """Stored results are keyed by as_dict(): a new field at its default must not change the key."""
    assert "transition" not in CommonConfig().as_dict()
    assert CommonConfig(transition="euler").as_dict()["transition"] == "euler"


# --- history --------------------------------------------------------------------------------

def _ctx(config):
    problem = toy_problem("gmm2d-linear")
    return RunContext.create(problem.denoiser(SCHEDULE), problem.reward, config)


@pytest.mark.parametrize("transition", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("nu, restarted", [(1.0, True), (0.0, False)])
def test_a_renoised_clone_restarts_its_solver_history_and_an_exact_clone_keeps_it(nu, restarted, transition):
    config = FVDConfig(n_particles=6, num_steps=4, eta=0.0, transition=transition, rebirth_noise=nu)
    ctx = _ctx(config)
    kernel = FVDKernel(config)
    x = torch.randn(6, 2, dtype=torch.float64)
    history = {**ctx.transition.initial_history(x), PREVIOUS_X0: x * 2, ORDER: torch.ones(6, dtype=torch.float64)}
    state = initial_state(x).with_history(history)
    state = type(state)(**{**state.__dict__, "x0_hat": x * 0.5, "eps_hat": x * 0.1})
    ancestors = torch.tensor([0, 0, 2, 2, 4, 5])
    outcome = selection.Selection(ancestors=ancestors, reborn=ancestors != torch.arange(6))
    info = ctx.grid[1]
    out = kernel.rebirth(ctx, state, outcome, info)
    order = out.history[ORDER]
    assert order[~outcome.reborn].tolist() == [1.0] * 4
    assert order[outcome.reborn].tolist() == ([0.0, 0.0] if restarted else [1.0, 1.0])


@pytest.mark.parametrize("transition", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("index", [1, 2, 5])
def test_a_restarted_particle_steps_first_order_whatever_its_stale_history(transition, index):
    """History is per particle: a row at order 0 ignores what its history tensors hold (a clone's
    parent's, or zeros) and takes the first-order step, which is DDIM(0); the others do not."""
    grid = _grid()
    solver = make_transition(CommonConfig(num_steps=8, eta=0.0, transition=transition), grid)
    info = grid[index]
    x0, eps, noise = _point(index)
    x = math.sqrt(info.alpha_bar) * x0 + math.sqrt(1 - info.alpha_bar) * eps
    gen = torch.Generator().manual_seed(index)
    stale = {key: 3 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
             for key, value in solver.initial_history(x).items()}
    stale[ORDER] = torch.tensor([0.0, 2.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    moved = solver.step(info, x, Prediction(x0=x0, eps=eps), stale, None)
    first = ddim_step(x0, eps, info.alpha_bar, info.alpha_bar_prev, 0.0, noise)
    restarted = stale[ORDER] == 0
    torch.testing.assert_close(moved.x[restarted], first[restarted], rtol=1e-10, atol=1e-10)
    for row in torch.nonzero(~restarted).flatten().tolist():
        assert not torch.allclose(moved.x[row], first[row], atol=1e-6), f"row {row} ignored its history"
    counted = {"dpmpp_2m": [1.0] * 5, "unipc": [1.0, 2.0, 1.0, 2.0, 2.0]}[transition]  # what it may use next
    assert moved.history[ORDER].tolist() == counted
    if SECOND_X0 in stale:  # UniPC: only a row at order 2 (from the third step on) reads x̂0 of two steps back
        again = solver.step(info, x, Prediction(x0=x0, eps=eps), {**stale, SECOND_X0: stale[SECOND_X0] + 1}, None).x
        reads = (stale[ORDER] >= 2) & (index >= 2)
        assert torch.equal(again[~reads], moved.x[~reads])
        assert all(not torch.allclose(again[row], moved.x[row]) for row in torch.nonzero(reads).flatten().tolist())


@pytest.mark.parametrize("transition", ["dpmpp_2m", "unipc"])
def test_fvd_with_a_multistep_solver_lands_on_the_exact_target(transition):
    """Clones step on with their parent's history: the tilted mixture is reached as with DDIM."""
    problem = toy_problem("gmm2d-component")
    res = fv.sample("fvd", problem.denoiser(SCHEDULE), problem.reward, lam=problem.lam, n_particles=1024,
                    num_steps=20, seed=3, eta=0.0, transition=transition)
    assert evaluate_against_target(res.samples, problem, seed=3).mass_on_target >= 0.97
