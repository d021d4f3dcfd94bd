"""SVDD-PM: exact-toy quality, exact cost formula, determinism, batching, λ = inf, config errors."""

import math

import pytest
import torch

import fvdiffusion as fv
from conftest import assert_approaches_target
from fvdiffusion.denoisers.base import CountingDenoiser
from fvdiffusion.samplers import ConfigError, METHODS, make_config
from fvdiffusion.samplers.svdd import SVDDConfig, choice_probabilities, draw_from, svdd_cost
from fvdiffusion.rewards.base import CountingReward


def test_svdd_is_registered():
    assert METHODS["svdd"].config_class is SVDDConfig
    assert make_config("svdd", n_candidates=3).n_candidates == 3


def test_svdd_approaches_the_exact_target_and_beats_base(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=128, num_steps=25, seed=0)
    res = fv.sample("svdd", den, problem.reward, n_candidates=4, **kw)
    base = fv.sample("base", den, problem.reward, **kw)
    assert_approaches_target(res, base, problem)
    assert res.config["method"] == "svdd"
    assert torch.equal(res.log_weights, torch.full((128,), -math.log(128), dtype=torch.float64))


@pytest.mark.parametrize("n,k,m,batch", [(6, 7, 3, None), (5, 4, 1, 2), (4, 1, 5, None)])
def test_svdd_cost_counters_match_the_formula(gmm2d, n, k, m, batch):
    problem, den = gmm2d
    counted, reward = CountingDenoiser(den), CountingReward(problem.reward)
    res = fv.sample("svdd", counted, reward, n_particles=n, num_steps=k, n_candidates=m, batch_size=batch)
    expected = svdd_cost(n, k, m)
    assert res.cost.denoiser_calls == counted.calls == expected["denoiser_calls"]
    assert res.cost.reward_calls == reward.calls == expected["reward_calls"]
    if k > 1:
        assert expected["denoiser_calls"] == n * (1 + m * (k - 1))
    # the returned rewards are those of the returned samples (reused, not re-evaluated)
    assert torch.allclose(res.rewards, problem.reward(res.samples).double(), atol=1e-6)


def test_svdd_same_seed_same_output_and_micro_batching_invariance(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=10, num_steps=8, n_candidates=4)
    a = fv.sample("svdd", den, problem.reward, seed=5, **kw)
    b = fv.sample("svdd", den, problem.reward, seed=5, batch_size=3, **kw)
    c = fv.sample("svdd", den, problem.reward, seed=6, **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.samples, c.samples)
    assert a.lineage.parents == [] and a.distinct_lineages() == 10  # particles never interact
    assert [t.step for t in a.trace] == list(range(8, 0, -1))


def test_svdd_infinite_lambda_takes_the_best_candidate(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=64, num_steps=15, n_candidates=4, seed=2)
    greedy = fv.sample("svdd", den, problem.reward, lam=math.inf, **kw)
    soft = fv.sample("svdd", den, problem.reward, lam=1.0, **kw)
    assert torch.isfinite(greedy.samples).all()
    assert all(t.ess == pytest.approx(1 / 4) for t in greedy.trace if t.selected)
    assert greedy.rewards.mean() > soft.rewards.mean()


def test_choice_probabilities_rules():
    values = torch.tensor([[0.0, math.log(3.0), -math.inf], [-math.inf, -math.inf, 1.0], [math.nan, -math.inf, 2.0]],
                          dtype=torch.float64)
    exists = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    p = choice_probabilities(values, exists, 1.0)
    assert torch.allclose(p[0], torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    assert torch.allclose(p[1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))  # all worthless: uniform
    assert torch.allclose(p[2], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))  # missing column ignored
    assert torch.equal(choice_probabilities(values, exists, math.inf)[0], torch.tensor([0.0, 1.0, 0.0],
                                                                                        dtype=torch.float64))
    # λ = 0 is uniform over the columns that are not worthless
    assert torch.allclose(choice_probabilities(values[:1], exists[:1], 0.0)[0],
                          torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    # inverse-CDF draws never land on a zero-mass column, whatever the uniform
    u = torch.linspace(0, 1 - 1e-12, 101, dtype=torch.float64)
    picks = draw_from(torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]], dtype=torch.float64).expand(101, 5), u)
    assert set(picks.tolist()) == {1, 3} and int((picks == 1).sum()) in range(29, 33)


@pytest.mark.parametrize("options,field", [({"eta": 0.0}, "eta"), ({"n_candidates": 0}, "n_candidates"),
                                           ({"n_candidates": 2.5}, "n_candidates"), ({"lam": -1.0}, "lam")])
def test_svdd_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"invalid {field}="):
        SVDDConfig(**options)


def test_svdd_accepts_infinite_lambda_in_config():
    assert math.isinf(SVDDConfig(lam=math.inf).lam)
