"""Diversity that copies cannot fool, final selection that never duplicates for nothing,
and non-finite rewards reported once per run."""

import warnings

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion.errors import AllParticlesDeadWarning, NonFiniteRewardWarning
from fvdiffusion.result import distinct_rows

ALL = [("base", {}), ("bon", {}), ("smc", {}), ("vasr", {}), ("fvd", {}), ("svdd", {"n_candidates": 2}),
       ("dts", {"n_rollouts": 16})]


def sharp_reward(x, cond=None):
    """Peaked at one point: with a large λ the single best particle takes every slot."""
    return -((x - torch.tensor([1.5, 0.0], dtype=x.dtype)) ** 2).sum(1)


def test_distinct_rows_counts_near_copies_once():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.cat([a, a + 1e-9, a[:1]])  # five rows, two points
    assert distinct_rows(x).tolist() == [0, 1]
    assert distinct_rows(x + torch.arange(5.0)[:, None] * 1e-3).numel() == 5


def test_ddim_plain_clones_score_one_on_every_measure(gmm2d):
    """DDIM η = 0 with ν = 0 and late, sharp selection: N copies of one point score 1 on each."""
    _, den = gmm2d
    res = fv.sample("fvd", den, sharp_reward, n_particles=32, num_steps=20, seed=0, eta=0.0,
                    rebirth_noise=0.0, lam=500.0, selection_start=0.7)
    assert torch.equal(res.samples, res.samples[:1].expand_as(res.samples))
    div = res.diversity()
    assert (div.distinct_samples, div.distinct_midpoint_ancestors, div.distinct_roots) == (1, 1, 1)
    assert res.summary()["distinct_samples"] == 1


def test_independent_samples_are_all_distinct(gmm2d):
    problem, den = gmm2d
    div = fv.sample("base", den, problem.reward, n_particles=32, num_steps=10, seed=0).diversity()
    assert (div.distinct_samples, div.distinct_midpoint_ancestors, div.distinct_roots) == (32, 32, 32)


def test_midpoint_ancestors_counted_among_distinct_samples_only(gmm2d):
    """Rebirth noise makes clones distinct samples that still share an ancestor: the counts differ."""
    _, den = gmm2d
    res = fv.sample("fvd", den, sharp_reward, n_particles=32, num_steps=20, seed=0, eta=0.0,
                    rebirth_noise=1.0, lam=50.0, selection_end=0.8, final_selection=False)
    div = res.diversity()
    assert div.distinct_samples == 32
    assert div.distinct_roots < div.distinct_samples
    assert div.distinct_roots <= div.distinct_midpoint_ancestors <= div.distinct_samples
    assert div.distinct_midpoint_ancestors == int(res.lineage.ancestors_at(10).unique().numel())


@pytest.mark.parametrize("method,opts", [("smc", {"ess_threshold": 0.5}), ("vasr", {}), ("fvd", {})])
def test_final_selection_on_uniform_weights_keeps_every_sample(gmm2d, method, opts):
    _, den = gmm2d
    flat = lambda x, cond=None: torch.zeros(x.shape[0])
    res = fv.sample(method, den, flat, n_particles=64, num_steps=8, seed=0, final_selection=True, **opts)
    assert res.diversity().distinct_samples == 64
    assert res.extras.get("final_dead_fraction", 0.0) == 0.0


@pytest.mark.parametrize("method", ["smc", "vasr"])
def test_final_selection_still_equalises_unequal_weights(gmm2d, method):
    problem, den = gmm2d
    res = fv.sample(method, den, problem.reward, n_particles=64, num_steps=8, seed=0, selection_interval=3)
    assert 0 in res.lineage.steps
    assert torch.allclose(res.log_weights, torch.full((64,), -torch.log(torch.tensor(64.0)).item(), dtype=torch.float64))
    assert 0 < res.extras["final_dead_fraction"] < 0.5  # minimal deaths, not a full multinomial redraw


@pytest.mark.parametrize("method,opts", ALL)
def test_all_nan_rewards_warn_once_per_run(gmm2d, method, opts):
    _, den = gmm2d
    nan = lambda x, cond=None: torch.full((x.shape[0],), float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fv.sample(method, den, nan, n_particles=16, num_steps=6, seed=0, **opts)
    ours = [w for w in caught if issubclass(w.category, NonFiniteRewardWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    health = res.extras["health"]
    assert health["nonfinite_rewards"] == health["reward_values"] == res.cost.reward_calls > 0
    assert str(health["nonfinite_rewards"]) in str(ours[0].message)
    assert torch.isfinite(res.samples).all()
    if method in ("smc", "vasr", "fvd"):
        assert issubclass(ours[0].category, AllParticlesDeadWarning)


def test_some_nan_rewards_counted_in_trace_health_and_one_warning(gmm2d):
    problem, den = gmm2d

    def holey(x, cond=None):
        r = problem.reward(x)
        r[::10] = float("nan")
        return r

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fv.sample("fvd", den, holey, n_particles=50, num_steps=10, seed=0)
    ours = [w for w in caught if issubclass(w.category, NonFiniteRewardWarning)]
    assert len(ours) == 1 and not issubclass(ours[0].category, AllParticlesDeadWarning)
    in_trace = sum(t.nonfinite_rewards for t in res.trace)
    assert in_trace == 5 * 10  # every 10th of 50, at each of 10 selection steps
    assert res.extras["health"]["nonfinite_rewards"] == in_trace + 5  # + the final rewards
    assert "55 of 550" in str(ours[0].message)


def test_finite_rewards_warn_nothing(gmm2d):
    problem, den = gmm2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fv.sample("fvd", den, problem.reward, n_particles=16, num_steps=5, seed=0)
