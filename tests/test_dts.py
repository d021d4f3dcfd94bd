"""Diffusion Tree Sampling: exact-toy quality, honest cost, tree rules, node budget, anytime, config errors."""

import math

import pytest
import torch

import fvdiffusion as fv
from conftest import assert_approaches_target
from fvdiffusion.denoisers.base import CountingDenoiser
from fvdiffusion.loop import RunContext
from fvdiffusion.samplers import ConfigError, METHODS, make_config
from fvdiffusion.samplers.dts import DTSConfig, DTSStarConfig, TreeSearch
from fvdiffusion.rewards.base import CountingReward


def grown_tree(gmm2d, batches=2, batch=12, **options):
    problem, den = gmm2d
    config = DTSConfig(n_particles=8, num_steps=6, **options)
    search = TreeSearch(RunContext.create(den, problem.reward, config), config)
    search.plant_root()
    for _ in range(batches):
        search.run_batch(batch)
    return search


def test_dts_and_dts_star_are_registered():
    assert METHODS["dts"].config_class is DTSConfig and METHODS["dts*"].config_class is DTSStarConfig
    assert make_config("dts*").greedy and not make_config("dts").greedy


def test_dts_approaches_the_exact_target_and_beats_base(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=128, num_steps=20, seed=0)
    res = fv.sample("dts", den, problem.reward, n_rollouts=256, **kw)
    base = fv.sample("base", den, problem.reward, **kw)
    assert_approaches_target(res, base, problem)
    assert res.config["method"] == "dts" and res.extras["rollouts"] == 256


@pytest.mark.parametrize("method,options", [("dts", {}), ("dts", {"widening_alpha": 0.5, "batch_size": 4}),
                                            ("dts*", {"node_budget": 40})])
def test_dts_cost_counters_are_exact(gmm2d, method, options):
    """Every tree node costs one denoiser call and every leaf one reward call; nothing else is called."""
    problem, den = gmm2d
    counted, reward = CountingDenoiser(den), CountingReward(problem.reward)
    res = fv.sample(method, counted, reward, n_particles=8, num_steps=8, n_rollouts=30, rollouts_per_batch=10,
                    **options)
    assert res.cost.denoiser_calls == counted.calls == res.extras["n_nodes"]
    assert res.cost.reward_calls == reward.calls == res.extras["n_leaves"]
    assert res.extras["anytime"][-1]["denoiser_calls"] == counted.calls
    assert torch.allclose(res.rewards, problem.reward(res.samples).double(), atol=1e-6)


def test_dts_same_seed_same_output_and_micro_batching_invariance(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=10, num_steps=8, n_rollouts=24, rollouts_per_batch=8)
    a = fv.sample("dts", den, problem.reward, seed=5, **kw)
    b = fv.sample("dts", den, problem.reward, seed=5, batch_size=3, **kw)
    c = fv.sample("dts", den, problem.reward, seed=6, **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.rewards, b.rewards)
    assert a.extras["n_nodes"] == b.extras["n_nodes"]
    assert not torch.equal(a.samples, c.samples)


def test_node_budget_is_respected_and_reported(gmm2d):
    problem, den = gmm2d
    counted = CountingDenoiser(den)
    res = fv.sample("dts", counted, problem.reward, n_particles=16, num_steps=10, n_rollouts=64,
                    rollouts_per_batch=16, node_budget=25)
    ex = res.extras
    assert ex["n_nodes"] <= 25 and counted.calls <= 25
    assert ex["budget_reached"] and ex["expansions_blocked_by_budget"] > 0
    assert ex["bytes_per_node"] == 2 * 2 * 4 + (4 + 5) * 8  # x̂0, ε̂ (2 floats each) + index/value fields
    assert ex["tree_bytes"] == ex["n_nodes"] * ex["bytes_per_node"]
    assert ex["tree_bytes_allocated"] <= 25 * ex["bytes_per_node"]
    assert res.samples.shape == (16, 2) and torch.isfinite(res.samples).all()


def test_fixed_branching_and_progressive_widening_limit_children(gmm2d):
    fixed = grown_tree(gmm2d, max_children=3)
    assert max(fixed.tree.n_children) == 3
    wide = grown_tree(gmm2d, max_children=5, widening_alpha=0.5, widening_c=1.0)
    tree = wide.tree
    for node in range(tree.n_nodes):
        assert tree.n_children[node] <= min(5, math.ceil(tree.visits[node] ** 0.5))
    assert tree.visits[0] == 24  # every rollout passes the root


@pytest.mark.parametrize("lam", [0.0, 0.5, math.inf])
def test_backup_is_the_soft_bellman_value(gmm2d, lam):
    search = grown_tree(gmm2d, lam=lam)
    tree = search.tree
    leaves = torch.nonzero(tree.depth[: tree.n_nodes] == search.leaf_depth).flatten()
    assert torch.equal(tree.value[leaves], tree.reward[leaves])
    for node in range(tree.n_nodes):
        if tree.depth[node] == search.leaf_depth:
            continue
        kids = tree.children[node, : tree.n_children[node]]
        assert tree.n_children[node] >= 1 and (tree.children[node, tree.n_children[node]:] == -1).all()
        v = tree.value[kids]
        if math.isinf(lam):
            expected = v.max()
        elif lam == 0:
            expected = v.mean()
        else:
            expected = (torch.logsumexp(lam * v, 0) - math.log(v.numel())) / lam
        assert float(tree.value[node]) == pytest.approx(float(expected), abs=1e-12)


def test_dts_star_with_infinite_lambda_returns_the_best_leaf(gmm2d):
    problem, den = gmm2d
    res = fv.sample("dts*", den, problem.reward, n_particles=8, num_steps=8, n_rollouts=40, rollouts_per_batch=8,
                    lam=math.inf)
    assert res.config["method"] == "dts*"
    assert torch.all(res.samples == res.samples[0])  # argmax descent: every sample is the same leaf
    assert float(res.rewards[0]) == res.extras["root_value"]  # V(root) = max leaf reward at λ = inf
    search = grown_tree(gmm2d, lam=math.inf, greedy=True)
    leaves = search.tree.depth[: search.tree.n_nodes] == search.leaf_depth
    assert search.tree.value[0] == search.tree.reward[: search.tree.n_nodes][leaves].max()


def test_anytime_curve_and_tree_lineage(gmm2d):
    problem, den = gmm2d
    res = fv.sample("dts", den, problem.reward, n_particles=64, num_steps=10, n_rollouts=96, rollouts_per_batch=32,
                    seed=3)
    anytime = res.extras["anytime"]
    assert [a["rollouts"] for a in anytime] == [32, 64, 96]
    assert all(a["denoiser_calls"] <= b["denoiser_calls"] for a, b in zip(anytime, anytime[1:]))
    # the exact expectation of a descent's reward agrees with the N sampled descents
    assert anytime[-1]["reward_mean_of_descent_samples"] == pytest.approx(float(res.rewards.mean()), abs=0.15)
    curve = res.lineage.genealogy_curve()
    assert curve[0] == 1  # one root
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == int(torch.unique(res.samples, dim=0).shape[0])  # distinct leaves
    assert [t.step for t in res.trace] == list(range(10, 0, -1))


@pytest.mark.parametrize("options,field", [
    ({"eta": 0.0}, "eta"), ({"max_children": 1}, "max_children"), ({"n_rollouts": 0}, "n_rollouts"),
    ({"node_budget": 49}, "node_budget"), ({"widening_alpha": 1.5}, "widening_alpha"),
    ({"widening_c": 0.0}, "widening_c"), ({"rollouts_per_batch": 0}, "rollouts_per_batch"),
    ({"greedy": "yes"}, "greedy"), ({"lam": -1.0}, "lam"),
])
def test_dts_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"invalid {field}="):
        DTSConfig(**options)


def test_dts_accepts_infinite_lambda_in_config():
    assert math.isinf(DTSConfig(lam=math.inf).lam) and math.isinf(DTSStarConfig(lam=math.inf).lam)
