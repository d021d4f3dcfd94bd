"""Diffusion Tree Sampling: exact-toy quality, consistent soft values, honest cost, tree rules, node budget,
anytime, config errors."""

import math
from functools import lru_cache

import pytest
import torch

import fvdiffusion as fv
from conftest import assert_approaches_target
from fvdiffusion.denoisers.base import CountingDenoiser
from fvdiffusion.loop import RunContext
from fvdiffusion.samplers import ConfigError, METHODS, make_config
from fvdiffusion.samplers.dts import DTSConfig, DTSStarConfig, TreeSearch
from fvdiffusion.rewards.base import CountingReward
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem


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
    assert ex["bytes_per_node"] == 2 * 2 * 4 + (4 + 7) * 8  # x̂0, ε̂ (2 floats each) + index/value fields
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


def subtree_leaves(tree, node):
    stack, leaves = [node], []
    while stack:
        n = stack.pop()
        kids = tree.children[n, : tree.n_children[n]].tolist()
        leaves += [] if kids else [n]
        stack += kids
    return torch.tensor(leaves)


@pytest.mark.parametrize("lam,batches,explore", [(0.0, 1, 0.5), (0.5, 1, 0.5), (0.5, 3, 1.0)])
def test_unweighted_values_are_soft_means_of_the_leaves_reached(gmm2d, lam, batches, explore):
    """With every importance weight 1 — the first batch only expands and joins; explore = 1 selects
    uniformly, weight (1/n) / (1/n) — V(s) = (1/λ) log mean exp(λ r) over the rollouts through s."""
    search = grown_tree(gmm2d, batches=batches, batch=40, lam=lam, explore=explore)
    tree = search.tree
    assert tree.n_children[0] == 4  # the test needs branching
    for node in range(tree.n_nodes):
        if tree.depth[node] == search.leaf_depth:
            assert tree.value[node] == tree.reward[node]
            continue
        leaves = subtree_leaves(tree, node)
        hits = torch.tensor([tree.visits[i] for i in leaves.tolist()], dtype=torch.float64)
        assert hits.sum() == tree.visits[node]
        r = tree.reward[leaves]
        if lam == 0:
            expected = (hits * r).sum() / hits.sum()
        else:
            expected = (torch.logsumexp(lam * r + hits.log(), 0) - hits.sum().log()) / lam
        assert float(tree.value[node]) == pytest.approx(float(expected), abs=1e-10)


def test_importance_mass_is_conserved_down_the_tree(gmm2d):
    """Every rollout through a node goes on through exactly one child: mass(s) = Σ mass(children)."""
    search = grown_tree(gmm2d, batches=4, batch=12, lam=0.5)
    tree = search.tree
    for node in range(tree.n_nodes):
        if tree.depth[node] < search.leaf_depth:
            kids = tree.children[node, : tree.n_children[node]]
            assert float(torch.logsumexp(tree.log_mass[kids], 0)) == pytest.approx(float(tree.log_mass[node]),
                                                                                     abs=1e-9)


@pytest.mark.parametrize("lam,greedy", [(math.inf, False), (0.5, True)])
def test_argmax_descent_keeps_the_nested_backup(gmm2d, lam, greedy):
    """dts* and λ = inf cannot importance-weight: V(s) = (1/λ) log mean_c exp(λ V(c)) (max at λ = inf)."""
    search = grown_tree(gmm2d, lam=lam, greedy=greedy)
    tree = search.tree
    leaves = torch.nonzero(tree.depth[: tree.n_nodes] == search.leaf_depth).flatten()
    assert torch.equal(tree.value[leaves], tree.reward[leaves])
    for node in range(tree.n_nodes):
        if tree.depth[node] == search.leaf_depth:
            continue
        kids = tree.children[node, : tree.n_children[node]]
        assert tree.n_children[node] >= 1 and (tree.children[node, tree.n_children[node]:] == -1).all()
        v = tree.value[kids]
        expected = v.max() if math.isinf(lam) else (torch.logsumexp(lam * v, 0) - math.log(v.numel())) / lam
        assert float(tree.value[node]) == pytest.approx(float(expected), abs=1e-12)


@lru_cache(maxsize=None)
def linear_toy(num_steps):
    """gmm2d-linear (λ = 1), and (1/λ) log mean exp(λ r) and E_π[r] over 100,000 base samples of the same
    K-step sampler: the soft value of the root and the tilted mean reward that DTS converges to."""
    problem = toy_problem("gmm2d-linear")
    den = problem.denoiser(VPSchedule.linear(1000))
    r = fv.sample("base", den, problem.reward, n_particles=100_000, num_steps=num_steps, seed=12345).rewards
    log_z = float(torch.logsumexp(r, 0) - math.log(r.numel()))
    return problem, den, log_z, float((torch.softmax(r, 0) * r).sum())


def test_root_value_converges_to_the_monte_carlo_log_z():
    """Consistency: the root soft value's error to log Z shrinks as rollouts grow (seed-averaged).

    Progressive widening with a high cap lets the children of every node keep growing, which
    consistency needs (a fixed branching factor freezes the top levels at 4 random children).
    The old nested backup fails this: it drifts low, from −0.2 at 64 rollouts to −0.26 at 1024.
    """
    problem, den, log_z, _ = linear_toy(8)
    errors = {}
    for rollouts in (64, 256, 1024):
        values = [fv.sample("dts", den, problem.reward, n_particles=16, num_steps=8, seed=seed, n_rollouts=rollouts,
                            max_children=64, widening_alpha=0.5).extras["root_value"] for seed in range(6)]
        errors[rollouts] = sum(abs(v - log_z) for v in values) / len(values)
    assert errors[64] > errors[256] > errors[1024]
    assert errors[1024] < 0.05


def test_final_descents_carry_the_full_tilt():
    """The exact mean reward of a final descent matches E_π[r] of the same sampler (the old descents by nested
    values reached about 0.3 of its 0.55 here: the refined branches' values had regressed)."""
    problem, den, _, tilted_mean = linear_toy(10)
    means = [fv.sample("dts", den, problem.reward, n_particles=32, num_steps=10, seed=seed, n_rollouts=512)
             .extras["anytime"][-1]["reward_mean_of_descent_samples"] for seed in range(6)]
    assert sum(means) / len(means) == pytest.approx(tilted_mean, abs=0.08)


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
    ({"greedy": "yes"}, "greedy"), ({"lam": -1.0}, "lam"), ({"explore": 1.5}, "explore"),
])
def test_dts_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"invalid {field}="):
        DTSConfig(**options)


def test_dts_accepts_infinite_lambda_in_config():
    assert math.isinf(DTSConfig(lam=math.inf).lam) and math.isinf(DTSStarConfig(lam=math.inf).lam)
