"""The particle engine: determinism, micro-batching, cost, lineage, faults and config errors."""

import math

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion.testbeds import toy_problem
from fvdiffusion.denoisers.base import CountingDenoiser
from fvdiffusion.errors import AllParticlesDeadWarning, RewardError
from fvdiffusion.samplers import ConfigError
from fvdiffusion.rewards.base import CountingReward

PARTICLE_METHODS = [("smc", {}), ("smc", {"scheme": "systematic", "potential": "max"}),
                    ("smc", {"ess_threshold": 0.5, "potential": "sum"}), ("vasr", {}), ("fvd", {}),
                    ("fvd", {"parent_rule": "weighted", "target_dead_fraction": 0.2}),
                    ("fvd", {"eta": 0.0, "selection_interval": 3, "selection_start": 0.2})]
ALL_METHODS = [("base", {}), ("bon", {})] + PARTICLE_METHODS


@pytest.mark.parametrize("method,opts", ALL_METHODS)
def test_same_seed_same_output_and_batching_invariance(gmm2d, method, opts):
    problem, den = gmm2d
    kw = dict(n_particles=32, num_steps=12, **opts)
    a = fv.sample(method, den, problem.reward, seed=3, **kw)
    b = fv.sample(method, den, problem.reward, seed=3, batch_size=5, **kw)
    c = fv.sample(method, den, problem.reward, seed=4, **kw)
    assert torch.equal(a.samples, b.samples)
    assert torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.samples, c.samples)
    assert torch.isfinite(a.samples).all()


@pytest.mark.parametrize("method,opts", ALL_METHODS)
def test_cost_counters_are_exact(gmm2d, method, opts):
    problem, den = gmm2d
    counted, reward = CountingDenoiser(den), CountingReward(problem.reward)
    res = fv.sample(method, counted, reward, n_particles=16, num_steps=10, seed=0, **opts)
    assert res.cost.denoiser_calls == counted.calls == 16 * 10
    assert res.cost.reward_calls == reward.calls
    assert res.cost.wall_seconds > 0
    if method in ("base", "bon"):
        assert reward.calls == 16  # only the final samples are scored


def test_fvd_reward_calls_follow_the_selection_schedule(gmm2d):
    problem, den = gmm2d
    reward = CountingReward(problem.reward)
    res = fv.sample("fvd", den, reward, n_particles=8, num_steps=10, selection_interval=3)
    selected = [t.step for t in res.trace if t.selected]
    assert selected == [10, 7, 4, 1]
    assert reward.calls == 8 * (len(selected) + 1)  # + the final selection on r(x0)


@pytest.mark.parametrize("method,opts", PARTICLE_METHODS)
def test_lineage_recovers_every_root(gmm2d, method, opts):
    """Following the recorded parents back to step K must land on the root each particle carries."""
    problem, den = gmm2d
    res = fv.sample(method, den, problem.reward, n_particles=64, num_steps=15, seed=1, **opts)
    roots = res.lineage.ancestors_at(15)
    curve = res.lineage.genealogy_curve()
    assert len(curve) == 15 and curve[-1] <= 64 and all(a <= b for a, b in zip(curve, curve[1:]))
    assert res.trace[-1].distinct_roots >= curve[0]
    # roots carried through gather agree with the lineage walk
    final_roots = res.trace[-1].distinct_roots
    assert int(roots.unique().numel()) <= final_roots
    assert res.distinct_lineages() == curve[15 - 7]


def test_fvd_constant_reward_kills_nobody(gmm2d):
    _, den = gmm2d
    flat = lambda x, cond=None: torch.zeros(x.shape[0])
    res = fv.sample("fvd", den, flat, n_particles=32, num_steps=8)
    assert all(t.dead_fraction == 0 for t in res.trace)
    assert res.distinct_lineages() == 32


def test_fvd_kills_fewer_than_smc_resamples(gmm2d):
    problem, den = gmm2d
    fvd = fv.sample("fvd", den, problem.reward, n_particles=256, num_steps=20, seed=0)
    smc = fv.sample("smc", den, problem.reward, n_particles=256, num_steps=20, seed=0)
    fvd_dead = sum(t.dead_fraction for t in fvd.trace)
    smc_dead = sum(t.dead_fraction for t in smc.trace)
    assert fvd_dead < smc_dead
    assert fvd.distinct_lineages() > smc.distinct_lineages()


def test_rebirth_noise_prevents_duplicates_under_ddim(gmm2d):
    problem, den = gmm2d
    kw = dict(n_particles=64, num_steps=20, eta=0.0, seed=0, final_selection=False)
    clones = fv.sample("fvd", den, problem.reward, rebirth_noise=0.0, **kw)
    fresh = fv.sample("fvd", den, problem.reward, rebirth_noise=1.0, **kw)
    assert torch.unique(clones.samples, dim=0).shape[0] < 64
    assert torch.unique(fresh.samples, dim=0).shape[0] == 64


def test_absorption_controller_tracks_target_fraction(gmm2d):
    problem, den = gmm2d
    res = fv.sample("fvd", den, problem.reward, n_particles=512, num_steps=60, target_dead_fraction=0.3,
                    controller_gain=2.0, seed=0)
    # in the last steps every particle sits in the target component and r ≈ 0 for all, so no
    # κ can make deaths; the controller is judged where selection is possible
    middle = [t.dead_fraction for t in res.trace[5:45]]
    assert abs(sum(middle) / len(middle) - 0.3) < 0.06
    assert res.trace[-1].kappa != 1.0


@pytest.mark.parametrize("method,opts", PARTICLE_METHODS)
def test_nan_and_inf_rewards_kill_those_particles(gmm2d, method, opts):
    problem, den = gmm2d

    def flaky(x, cond=None):
        r = problem.reward(x).clone()
        r[::4] = float("nan")
        r[1::4] = float("inf")
        return r

    res = fv.sample(method, den, flaky, n_particles=32, num_steps=8, seed=0, **opts)
    assert torch.isfinite(res.samples).all()
    assert sum(t.nonfinite_rewards for t in res.trace) > 0
    assert not torch.isnan(res.log_weights).any()


@pytest.mark.parametrize("method,opts", PARTICLE_METHODS)
def test_all_dead_continues_with_uniform_weights_and_warns(gmm2d, method, opts):
    _, den = gmm2d
    dead = lambda x, cond=None: torch.full((x.shape[0],), float("nan"))
    with pytest.warns(AllParticlesDeadWarning):
        res = fv.sample(method, den, dead, n_particles=16, num_steps=5, seed=0, **opts)
    assert torch.isfinite(res.samples).all() and res.samples.shape == (16, 2)


def test_reward_wrong_shape_names_shapes(gmm2d):
    _, den = gmm2d
    with pytest.raises(RewardError, match=r"shape \(16, 1\) at step k=\d+: expected a float tensor of shape \(16,\)"):
        fv.sample("fvd", den, lambda x, c=None: torch.zeros(x.shape[0], 1), n_particles=16, num_steps=3)


def test_reward_wrong_dtype(gmm2d):
    _, den = gmm2d
    with pytest.raises(RewardError, match="dtype torch.int64"):
        fv.sample("smc", den, lambda x, c=None: torch.zeros(x.shape[0], dtype=torch.long), n_particles=4, num_steps=3)


def test_reward_exception_names_the_step(gmm2d):
    _, den = gmm2d
    calls = []

    def boom(x, cond=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("model offline")
        return torch.zeros(x.shape[0])

    with pytest.raises(RewardError, match=r"step k=8.*model offline") as info:
        fv.sample("fvd", den, boom, n_particles=4, num_steps=10)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("method,opts,field", [
    ("fvd", {"n_particles": 0}, "n_particles"),
    ("fvd", {"rebirth_noise": 1.5}, "rebirth_noise"),
    ("fvd", {"rebirth_noise": -0.1}, "rebirth_noise"),
    ("fvd", {"lam": -1.0}, "lam"),
    ("fvd", {"lam": math.nan}, "lam"),
    ("fvd", {"parent_rule": "random"}, "parent_rule"),
    ("fvd", {"potential": "sum"}, "potential"),
    ("fvd", {"selection_start": 0.8, "selection_end": 0.5}, "selection_start"),
    ("smc", {"scheme": "bogus"}, "scheme"),
    ("smc", {"ess_threshold": 2.0}, "ess_threshold"),
    ("smc", {"eta": 1.2}, "eta"),
    ("bon", {"top_k": 0}, "top_k"),
    ("nosuch", {}, "method"),
    ("fvd", {"rebirth": 0.5}, "rebirth"),
])
def test_invalid_config_names_field_and_value(gmm2d, method, opts, field):
    problem, den = gmm2d
    with pytest.raises(ValueError, match=field):
        fv.sample(method, den, problem.reward, **opts)


def test_config_error_is_raised_at_construction():
    with pytest.raises(ConfigError, match=r"invalid n_particles=0"):
        fv.make_config("fvd", n_particles=0)


def test_method_needing_reward_refuses_none(gmm2d):
    _, den = gmm2d
    with pytest.raises(ValueError, match="needs a reward"):
        fv.sample("fvd", den, None)


def test_bon_ranks_by_reward(gmm2d):
    problem, den = gmm2d
    res = fv.sample("bon", den, problem.reward, n_particles=32, num_steps=10, top_k=4)
    assert torch.all(res.rewards[:-1] >= res.rewards[1:])
    assert torch.equal(res.extras["top_k_samples"], res.samples[:4])


def test_final_selection_gives_uniform_weights(gmm2d):
    problem, den = gmm2d
    for method in ("smc", "vasr", "fvd"):
        res = fv.sample(method, den, problem.reward, n_particles=16, num_steps=6)
        assert torch.allclose(res.log_weights, torch.full((16,), -math.log(16), dtype=torch.float64))
    linear = toy_problem("gmm2d-linear").reward  # spread-out rewards keep the weights unequal
    res = fv.sample("smc", den, linear, n_particles=16, num_steps=6, final_selection=False, selection_interval=4)
    assert not torch.allclose(res.log_weights, torch.full((16,), -math.log(16), dtype=torch.float64))


def test_summary_is_json_ready(gmm2d):
    import json

    problem, den = gmm2d
    res = fv.sample("fvd", den, problem.reward, n_particles=8, num_steps=4)
    text = json.dumps(res.summary())
    assert '"denoiser_calls"' not in text and '"cost_denoiser_calls": 32' in text
