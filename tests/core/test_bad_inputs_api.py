"""Bad inputs and faults through the Python API, for every method: each one either fails with a
one-line typed error that names the step or the field, or gives a correct result with exactly
one warning that carries the counts. Never NaN samples, never a silent wrong result."""

import math
import warnings

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion.errors import DenoiserError, NonFiniteDenoiserWarning, NonFiniteRewardWarning
from fvdiffusion.samplers import ConfigError

# small enough that the whole table runs in seconds; svdd and dts with their cheapest budgets
METHODS = {"base": {}, "bon": {}, "smc": {}, "vasr": {}, "fvd": {}, "svdd": {"n_candidates": 2},
           "dts": {"n_rollouts": 8}, "dts*": {"n_rollouts": 8}}
SIZE = dict(n_particles=8, num_steps=4, seed=0)


class FaultyDenoiser:
    """The exact toy denoiser, except that from its second call on it returns ``value`` in every
    ``every``-th row (``every=1``: all rows), or raises."""

    def __init__(self, inner, value=math.nan, every=4, raises=False):
        self.inner, self.value, self.every, self.raises, self.calls = inner, value, every, raises, 0
        self.schedule, self.prediction_type, self.sample_shape = inner.schedule, inner.prediction_type, inner.sample_shape

    def __call__(self, x, t, cond=None):
        self.calls += 1
        out = self.inner(x, t, cond)
        if self.calls == 1:
            return out
        if self.raises:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line of the report")
        out = out.clone()
        out[:: self.every] = self.value
        return out


def nan_rewards(reward, fraction):
    """``reward`` with NaN in every (1/fraction)-th row."""
    def holey(x, cond=None):
        r = reward(x).clone()
        r[:: round(1 / fraction)] = math.nan
        return r

    return holey


def run(method, denoiser, reward, **options):
    """(result, our warnings) of one run, every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fv.sample(method, denoiser, reward, **SIZE, **METHODS[method], **options)
    ours = [w for w in caught if issubclass(w.category, (NonFiniteRewardWarning, NonFiniteDenoiserWarning))]
    return result, ours


def assert_one_line(error, *needles):
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


def assert_healthy_output(result):
    assert result.samples.shape == (SIZE["n_particles"], 2)
    assert torch.isfinite(result.samples).all()
    assert not torch.isnan(result.log_weights).any()


# --- the denoiser -------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_denoiser_output_is_a_one_line_error_naming_step_and_count(gmm2d, method, value):
    problem, den = gmm2d
    with pytest.raises(DenoiserError) as info:
        run(method, FaultyDenoiser(den, value), problem.reward)
    assert_one_line(info.value, "NaN/inf at step k=", "(t=", " of ", "nonfinite_denoiser='kill'")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("method", METHODS)
def test_denoiser_exception_is_wrapped_with_the_step(gmm2d, method):
    problem, den = gmm2d
    with pytest.raises(DenoiserError) as info:
        run(method, FaultyDenoiser(den, raises=True), problem.reward)
    assert_one_line(info.value, "denoiser raised at step k=", "RuntimeError: CUDA error")
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("method", METHODS)
def test_denoiser_wrong_shape_or_type_names_the_step(gmm2d, method):
    problem, den = gmm2d

    class Wrong(FaultyDenoiser):
        def __call__(self, x, t, cond=None):
            return self.value(x)

    with pytest.raises(DenoiserError) as info:
        run(method, Wrong(den, value=lambda x: x[:, :1]), problem.reward)
    assert_one_line(info.value, "1), expected (", "step k=")  # (rows, 1) for (rows, 2); dts's root is one row
    with pytest.raises(DenoiserError) as info:
        run(method, Wrong(den, value=lambda x: x.numpy()), problem.reward)
    assert_one_line(info.value, "torch.Tensor, got ndarray", "step k=")


@pytest.mark.parametrize("method", METHODS)
def test_kill_drops_nonfinite_denoiser_outputs_counts_them_and_warns_once(gmm2d, method):
    problem, den = gmm2d
    res, ours = run(method, FaultyDenoiser(den), problem.reward, nonfinite_denoiser="kill")
    assert_healthy_output(res)
    health = res.extras["health"]
    assert health["nonfinite_denoiser"] > 0 and health["nonfinite_rewards"] == 0
    assert res.summary()["nonfinite_denoiser"] == health["nonfinite_denoiser"]
    assert len(ours) == 1 and ours[0].category is NonFiniteDenoiserWarning
    assert f"{health['nonfinite_denoiser']} of {health['denoiser_values']} denoiser outputs" in str(ours[0].message)
    if method not in ("svdd", "dts", "dts*"):  # every 4th of 8 rows after the first call: 2 per step
        assert health["nonfinite_denoiser"] == 2 * (SIZE["num_steps"] - 1)
        assert res.config["nonfinite_denoiser"] == "kill"


@pytest.mark.parametrize("method", METHODS)
def test_kill_with_every_output_nonfinite_is_a_one_line_error(gmm2d, method):
    problem, den = gmm2d
    with pytest.raises(DenoiserError) as info:
        run(method, FaultyDenoiser(den, every=1), problem.reward, nonfinite_denoiser="kill")
    assert_one_line(info.value, "NaN/inf", "nonfinite_denoiser='kill'")


@pytest.mark.parametrize("method", METHODS)
def test_kill_changes_nothing_in_a_healthy_run(gmm2d, method):
    problem, den = gmm2d
    plain, _ = run(method, den, problem.reward)
    kill, ours = run(method, den, problem.reward, nonfinite_denoiser="kill")
    assert torch.equal(plain.samples, kill.samples) and not ours
    assert "nonfinite_denoiser" not in plain.config  # the default stays out of stored fingerprints


def test_kill_rebirth_is_in_the_lineage(gmm2d):
    """A killed slot holds a copy of a survivor, and the lineage says which: alone (base) and
    composed with the selection of the same step (fvd), so the genealogy curve sees both."""
    problem, den = gmm2d
    res, _ = run("base", FaultyDenoiser(den), problem.reward, nonfinite_denoiser="kill")
    assert res.lineage.steps == [3, 2, 1]
    roots = res.lineage.ancestors_at(SIZE["num_steps"])
    assert not set(roots.tolist()) & {0, 4}  # slots 0 and 4 were killed at every step after the first
    res, _ = run("fvd", FaultyDenoiser(den), problem.reward, nonfinite_denoiser="kill")
    assert res.lineage.steps == [4, 3, 2, 1, 0]  # one record per step, the kills folded into the selections
    walked = [int(res.lineage.ancestors_at(k).unique().numel()) for k in range(SIZE["num_steps"], 0, -1)]
    assert res.lineage.genealogy_curve() == walked


# --- the reward -------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fraction", [1.0, 0.1])
def test_nonfinite_rewards_give_a_result_and_exactly_one_warning_with_counts(gmm2d, method, fraction):
    problem, den = gmm2d
    res, ours = run(method, den, nan_rewards(problem.reward, fraction))
    assert_healthy_output(res)
    health = res.extras["health"]
    assert 0 < health["nonfinite_rewards"] <= health["reward_values"] == res.cost.reward_calls
    if fraction == 1.0:
        assert health["nonfinite_rewards"] == health["reward_values"]
    assert res.summary()["nonfinite_rewards"] == health["nonfinite_rewards"]
    assert len(ours) == 1 and issubclass(ours[0].category, NonFiniteRewardWarning)
    assert f"{health['nonfinite_rewards']} of {health['reward_values']} reward values" in str(ours[0].message)


@pytest.mark.parametrize("method", METHODS)
def test_lambda_that_overflows_is_refused_naming_lam(gmm2d, method):
    problem, den = gmm2d
    if method in ("base", "bon"):  # λ plays no part: the result is the plain one, silently and correctly
        res, ours = run(method, den, problem.reward, lam=1e308)
        assert torch.equal(res.samples, run(method, den, problem.reward)[0].samples) and not ours
        return
    with pytest.raises(ConfigError) as info:
        run(method, den, problem.reward, lam=1e308)
    assert_one_line(info.value, "invalid lam=1e+308", "overflows float64")


@pytest.mark.parametrize("method", ["svdd", "dts", "dts*"])
def test_infinite_lambda_keeps_its_meaning_for_argmax_methods(gmm2d, method):
    problem, den = gmm2d
    res, ours = run(method, den, problem.reward, lam=math.inf)
    assert_healthy_output(res)
    assert not ours


# --- the config -------------------------------------------------------------------------

COMMON_BAD = [({"n_particles": 0}, "n_particles"), ({"n_particles": -3}, "n_particles"),
              ({"n_particles": "8"}, "n_particles"), ({"num_steps": 0}, "num_steps"),
              ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"eta": 2.0}, "eta"),
              ({"lam": math.nan}, "lam"), ({"lam": -1.0}, "lam"), ({"lam": "1"}, "lam"),
              ({"nonfinite_denoiser": "drop"}, "nonfinite_denoiser"), ({"nonfinite_denoiser": True}, "nonfinite_denoiser")]
METHOD_BAD = {
    "bon": [({"top_k": 0}, "top_k"), ({"top_k": 9}, "top_k")],
    "smc": [({"final_selection": "False"}, "final_selection"), ({"scheme": "systemtic"}, "did you mean 'systematic'"),
            ({"selection_interval": 0}, "selection_interval")],
    "vasr": [({"final_selection": "False"}, "final_selection")],
    "fvd": [({"final_selection": "False"}, "final_selection"), ({"nu_by_copies": "True"}, "nu_by_copies"),
            ({"rebirth_noise": 2.0}, "rebirth_noise"), ({"langevin_steps": 0}, "langevin_steps")],
    "svdd": [({"n_candidates": 0}, "n_candidates"), ({"eta": 0.0}, "eta")],
    "dts": [({"n_rollouts": 0}, "n_rollouts"), ({"max_children": 1}, "max_children"), ({"greedy": "yes"}, "greedy"),
            ({"node_budget": 2}, "node_budget")],
    "dts*": [({"n_rollouts": -1}, "n_rollouts")],
}
CONFIG_CASES = [(m, opts, needle) for m in METHODS for opts, needle in COMMON_BAD + METHOD_BAD.get(m, [])]
CONFIG_CASES += [(m, {"lam": math.inf}, "lam") for m in ("base", "bon", "smc", "vasr", "fvd")]


@pytest.mark.parametrize("method,options,needle", CONFIG_CASES)
def test_bad_config_values_are_one_line_errors_naming_the_field(gmm2d, method, options, needle):
    problem, den = gmm2d
    with pytest.raises(ConfigError) as info:
        fv.sample(method, den, problem.reward, **{**SIZE, **options})
    assert_one_line(info.value, needle)
    with pytest.raises(ConfigError):
        fv.make_config(method, **{**SIZE, **options})


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_suggests_the_nearest_name(gmm2d, method):
    problem, den = gmm2d
    with pytest.raises(ConfigError) as info:
        fv.sample(method, den, problem.reward, n_particle=8)
    assert_one_line(info.value, "invalid option 'n_particle'", "did you mean 'n_particles'?")
    with pytest.raises(ConfigError) as info:
        fv.make_config(method, zzz=1)
    assert_one_line(info.value, "invalid option 'zzz'")
    assert "did you mean" not in str(info.value)


def test_unknown_method_suggests_the_nearest_name(gmm2d):
    problem, den = gmm2d
    with pytest.raises(ConfigError) as info:
        fv.sample("fvdd", den, problem.reward)
    assert_one_line(info.value, "invalid method='fvdd'", "did you mean 'fvd'?")


def test_fvd_absorption_controller_kappa_stays_bounded(gmm2d):
    """A huge controller gain used to push log kappa past exp()'s range (OverflowError mid-run)."""
    from fvdiffusion.samplers.fvd import MAX_LOG_KAPPA

    problem, den = gmm2d
    res = fv.sample("fvd", den, problem.reward, n_particles=32, num_steps=10, seed=0, lam=problem.lam,
                    target_dead_fraction=0.9, controller_gain=1e6)
    assert math.isfinite(res.extras["final_kappa"]) and res.extras["final_kappa"] <= math.exp(MAX_LOG_KAPPA)
