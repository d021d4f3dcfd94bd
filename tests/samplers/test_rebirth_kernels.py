"""FVD's rebirth kernels: ν schedules, ν by copies, and the Langevin move on p_t."""

import math

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion import selection
from fvdiffusion.denoisers.base import CountingDenoiser
from fvdiffusion.loop import RunContext, StepInfo
from fvdiffusion.metrics.targets import sliced_wasserstein2
from fvdiffusion.population import initial_state
from fvdiffusion.samplers import ConfigError
from fvdiffusion.samplers.fvd import FVDConfig, FVDKernel
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem


def _info(index: int, num_steps: int, alpha_bar: float = 0.5, t: int = 500) -> StepInfo:
    return StepInfo(k=num_steps - index, index=index, t=t, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar)


@pytest.mark.parametrize("field,value", [("rebirth", "jump"), ("nu_schedule", "cosine"), ("nu_by_copies", "yes"),
                                         ("langevin_steps", 0), ("langevin_step", 2.0), ("final_selection", "False")])
def test_bad_kernel_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        FVDConfig(**{field: value})


def test_nu_schedules_scale_over_the_trajectory():
    outcome = selection.Selection(ancestors=torch.tensor([0, 0, 2, 3]), reborn=torch.tensor([False, True, False, False]))
    nus = {}
    for schedule in ("constant", "decay", "grow"):
        policy = FVDKernel(FVDConfig(num_steps=11, rebirth_noise=0.8, nu_schedule=schedule))
        nus[schedule] = [float(policy._clone_nu(outcome, _info(i, 11))[1]) if policy._clone_nu(outcome, _info(i, 11))
                         is not None else 0.0 for i in (0, 5, 10)]
    assert nus["constant"] == pytest.approx([0.8, 0.8, 0.8])
    assert nus["decay"] == pytest.approx([0.8, 0.4, 0.0])
    assert nus["grow"] == pytest.approx([0.0, 0.4, 0.8])


def test_nu_grows_with_the_parents_copies():
    # particle 0 fills slots 0, 1, 2 (3 copies), particle 3 fills slots 3, 4 (2 copies), 5 is alone
    outcome = selection.Selection(ancestors=torch.tensor([0, 0, 0, 3, 3, 5]),
                                  reborn=torch.tensor([False, True, True, False, True, False]))
    policy = FVDKernel(FVDConfig(num_steps=10, rebirth_noise=0.9, nu_by_copies=True))
    nu = policy._clone_nu(outcome, _info(0, 10))
    assert nu[[1, 2, 4]].tolist() == pytest.approx([0.9 * (1 - 1 / 3), 0.9 * (1 - 1 / 3), 0.9 * 0.5])


def test_langevin_counts_one_denoiser_call_per_clone_per_step(gmm2d):
    problem, den = gmm2d
    counted = CountingDenoiser(den)
    res = fv.sample("fvd", counted, problem.reward, n_particles=64, num_steps=10, seed=0, rebirth="langevin",
                    langevin_steps=2, final_selection=False)
    clones = sum(round(t.dead_fraction * 64) for t in res.trace if t.selected)
    assert clones > 0
    assert res.cost.denoiser_calls == counted.calls == 64 * 10 + 2 * clones


def test_langevin_move_keeps_p_t_and_separates_clones():
    """Exact p_t samples, all moved as if reborn: as close to p_t as before the move, no two alike.

    One unadjusted step of δ = 0.2·(1 − ᾱ) (a grid kernel); larger steps are biased (ULA), which
    docs/method.md reports. Compared with the unmoved set, since one exact set's SW2 is itself noisy.
    """
    problem = toy_problem("gmm2d-base")
    schedule = VPSchedule.linear(1000)
    den = problem.denoiser(schedule)
    t = 400
    alpha_bar = float(schedule.alpha_bar(t))
    p_t = problem.mixture.noised(alpha_bar)
    x = p_t.sample(2048, torch.Generator().manual_seed(0))
    cfg = FVDConfig(n_particles=2048, num_steps=10, rebirth="langevin", langevin_step=0.2, langevin_steps=1)
    ctx = RunContext.create(den, problem.reward, cfg)
    pred, _ = ctx.denoise(x, t, alpha_bar)
    state = initial_state(x)
    state = type(state)(x=x, x0_hat=pred.x0, eps_hat=pred.eps, reward=state.reward, log_weight=state.log_weight,
                        root=state.root)
    everyone = selection.Selection(ancestors=torch.arange(2048), reborn=torch.ones(2048, dtype=torch.bool))
    moved = FVDKernel(cfg).rebirth(ctx, state, everyone, _info(0, 10, alpha_bar, t)).x
    exact = p_t.sample(4096, torch.Generator().manual_seed(1))
    before = sliced_wasserstein2(x, exact)
    assert sliced_wasserstein2(moved, exact) < 1.2 * before
    assert (moved - x).norm(dim=1).min() > 1e-3
    # the planted opposite: the same noise without the score drift leaves p_t
    delta = 0.2 * (1 - alpha_bar)
    diffused = x + math.sqrt(2 * delta) * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert sliced_wasserstein2(diffused, exact) > 2.0 * before


def test_langevin_rebirth_ends_ddim_collapse(gmm2d):
    _, den = gmm2d
    sharp = lambda x, cond=None: -((x - torch.tensor([1.5, 0.0])) ** 2).sum(1)
    kw = dict(n_particles=32, num_steps=20, seed=0, eta=0.0, lam=50.0, final_selection=False, selection_end=0.8)
    plain = fv.sample("fvd", den, sharp, rebirth_noise=0.0, **kw)
    moved = fv.sample("fvd", den, sharp, rebirth="langevin", **kw)
    assert plain.diversity().distinct_samples < 8, plain.diversity()
    assert moved.diversity().distinct_samples == 32


def test_kernel_defaults_follow_the_sampler_unless_the_user_sets_one():
    from fvdiffusion.samplers.fvd import DEFAULT_KERNEL_DDIM, DEFAULT_KERNEL_STOCHASTIC, NEUTRAL_KERNEL

    kernel = lambda cfg: {name: getattr(cfg, name) for name in NEUTRAL_KERNEL}
    assert kernel(FVDConfig(eta=1.0)) == DEFAULT_KERNEL_STOCHASTIC
    assert kernel(FVDConfig(eta=0.0)) == DEFAULT_KERNEL_DDIM
    mine = FVDConfig(eta=0.0, rebirth_noise=0.7)
    assert kernel(mine) == {**NEUTRAL_KERNEL, "rebirth_noise": 0.7}
