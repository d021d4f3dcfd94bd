"""Fleming–Viot with a low-variance allocation of the dead (issue 19 item 2).

Survival must stay independent across particles whatever the allocation; only the D dead
slots are shared out over the parents' birth mass. Planted bugs these tests turn red (each
checked by hand before landing):

- parents drawn from the full weights n instead of the excess (n − 1)_+ under the "excess"
  rule: ``test_every_allocation_is_unbiased`` (surely-surviving parents then get too few births);
- survival drawn by a systematic pass (one offset over the cumulative survival
  probabilities) or by stratified uniforms in a shuffled order, instead of independent
  Bernoulli draws: ``test_survival_is_independent_for_every_allocation`` (the death count's
  variance drops below Σ s(1 − s); survivals become correlated);
- the systematic allocation falling back to i.i.d. draws:
  ``test_systematic_allocation_gives_each_parent_floor_or_ceil_of_its_share`` and the
  offspring-variance tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdiffusion import selection
from fvdiffusion.selection import ALLOCATIONS, PARENT_RULES, fleming_viot

REPS = 6000
NEG_INF = float("-inf")
SKEWED = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.5, 1.1, NEG_INF, -2.5], dtype=torch.float64)
SPREAD = torch.tensor([4.0, -3.0, 1.5, -6.0, 3.5, 0.0, -1.0, -9.0], dtype=torch.float64)
# Several parents with excess and many marginal particles: where allocations differ most.
WIDE = torch.linspace(-2.0, 2.0, 16, dtype=torch.float64) ** 3 / 4


def draw(log_w, allocation, parent_rule="excess", reps=REPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return fleming_viot(log_w.expand(reps, log_w.shape[-1]), generator, parent_rule=parent_rule,
                        allocation=allocation)


def counts_of(ancestors):
    return torch.zeros_like(ancestors).scatter_add_(-1, ancestors, torch.ones_like(ancestors))


def expected(log_w):
    return log_w.shape[-1] * torch.softmax(log_w.double(), dim=-1)


@pytest.mark.parametrize("log_w", [SKEWED, SPREAD, WIDE], ids=["skewed", "spread", "wide"])
@pytest.mark.parametrize("parent_rule", PARENT_RULES)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_every_allocation_is_unbiased(allocation, parent_rule, log_w):
    counts = counts_of(draw(log_w, allocation, parent_rule).ancestors).double()
    size = log_w.numel()
    assert bool((counts.sum(-1) == size).all())
    error = (counts.mean(0) - expected(log_w)).abs()
    standard_error = counts.std(0) / math.sqrt(REPS)
    assert bool((error <= 5 * standard_error + 1e-3).all()), (allocation, parent_rule, error, standard_error)


@pytest.mark.parametrize("log_w", [SKEWED, WIDE], ids=["skewed", "wide"])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_survival_is_independent_for_every_allocation(allocation, log_w):
    n = expected(log_w)
    result = draw(log_w, allocation)
    at_risk = (n < 1) & (n > 0.05)          # particles whose survival is a real coin flip
    alive = (~result.reborn[:, at_risk]).double()
    s = n[at_risk]
    # marginals: P(alive_i) = min(1, n_i)
    assert torch.allclose(alive.mean(0), s, atol=5 * 0.5 / math.sqrt(REPS))
    # independence: Var(#alive) = Σ s(1 − s), no negative correlation between neighbours
    var_sum = (s * (1 - s)).sum().item()
    observed = alive.sum(-1).var().item()
    # the sample variance of REPS draws has relative sd ≈ sqrt(2/REPS) for near-normal counts
    assert abs(observed - var_sum) <= 6 * var_sum * math.sqrt(2 / REPS), (observed, var_sum)
    centred = alive - alive.mean(0)
    cov = (centred.T @ centred) / (REPS - 1)
    off_diagonal = cov[~torch.eye(cov.shape[0], dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 * 0.25 / math.sqrt(REPS)


@pytest.mark.parametrize("log_w", [SKEWED, SPREAD, WIDE], ids=["skewed", "spread", "wide"])
def test_systematic_allocation_gives_each_parent_floor_or_ceil_of_its_share(log_w):
    n = expected(log_w)
    result = draw(log_w, "systematic", reps=2000)
    counts = counts_of(result.ancestors).double()
    dead = result.reborn.sum(-1, keepdim=True).double()
    mass = (n - 1).clamp(min=0)
    share = dead * mass / mass.sum()
    parents = n > 1            # they survive surely, so births = counts − 1
    births = counts[:, parents] - 1
    assert bool((births >= torch.floor(share[:, parents] - 1e-9)).all())
    assert bool((births <= torch.ceil(share[:, parents] + 1e-9)).all())


def test_systematic_allocation_equals_residual_systematic():
    # whole shares first, then one shared offset over the fractions: the same counts
    log_w = torch.tensor([3.0, 2.5, 2.2, 0.0, -1.0, -1.5, -2.0, -2.0, -3.0, -3.0], dtype=torch.float64)
    n = expected(log_w)
    result = draw(log_w, "systematic", reps=500)
    counts = counts_of(result.ancestors).double()
    dead = result.reborn.sum(-1, keepdim=True).double()
    mass = (n - 1).clamp(min=0)
    share = dead * mass / mass.sum()
    births = counts - (~result.reborn).double()
    assert bool((births >= torch.floor(share) - 1e-9).all())
    assert bool((births.sum(-1, keepdim=True) == dead).all())


def test_systematic_allocation_lowers_the_offspring_variance():
    allocation = "systematic"
    for log_w in (SKEWED, WIDE):
        multinomial = selection.offspring_variance(log_w, draw(log_w, "multinomial").ancestors).mean()
        low = selection.offspring_variance(log_w, draw(log_w, allocation).ancestors).mean()
        assert low < 0.8 * multinomial, (allocation, low, multinomial)


def test_offspring_variance_matches_its_definition_and_multinomial_theory():
    generator = torch.Generator().manual_seed(3)
    rows = SKEWED.expand(REPS, 8)
    ancestors = selection.multinomial(rows, generator).ancestors
    n = expected(SKEWED)
    direct = ((counts_of(ancestors).double() - n) ** 2).mean(-1)
    assert torch.allclose(selection.offspring_variance(rows, ancestors), direct)
    theory = (n * (1 - n / 8)).sum().item() / 8
    assert selection.offspring_variance(rows, ancestors).mean().item() == pytest.approx(theory, rel=0.05)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_uniform_zero_and_one_hot_weights(allocation):
    uniform = draw(torch.full((8,), -2.0), allocation, reps=500)
    assert not bool(uniform.reborn.any())
    zeros = draw(torch.tensor([NEG_INF, 0.5, NEG_INF, -1.0, 2.0, NEG_INF]), allocation, reps=1000)
    assert not bool(torch.isin(zeros.ancestors, torch.tensor([0, 2, 5])).any())
    one_hot = draw(torch.tensor([NEG_INF, NEG_INF, 0.0, NEG_INF]), allocation, reps=200)
    assert bool((one_hot.ancestors == 2).all())


def test_bad_allocation_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"allocation.*'bogus'.*multinomial.*systematic"):
        fleming_viot(SKEWED, torch.Generator(), allocation="bogus")


def test_multinomial_allocation_keeps_the_recorded_random_stream():
    # the allocation switch must not move the default's draws (the golden engine outputs rely on it)
    a = fleming_viot(SKEWED.expand(50, 8), torch.Generator().manual_seed(9))
    b = fleming_viot(SKEWED.expand(50, 8), torch.Generator().manual_seed(9), allocation="multinomial")
    assert torch.equal(a.ancestors, b.ancestors)
    c = fleming_viot(SKEWED.expand(50, 8), torch.Generator().manual_seed(9), allocation="systematic")
    assert not torch.equal(a.ancestors, c.ancestors)


log_weight_vectors = st.lists(
    st.one_of(st.floats(min_value=-60, max_value=60), st.just(NEG_INF)), min_size=1, max_size=12
).filter(lambda values: any(v != NEG_INF for v in values))


@settings(max_examples=40, deadline=None)
@given(values=log_weight_vectors, seed=st.integers(0, 2**31 - 1))
def test_property_every_allocation_gives_a_valid_stable_selection(values, seed):
    log_w = torch.tensor(values, dtype=torch.float64)
    size = log_w.numel()
    n = expected(log_w)
    for parent_rule in PARENT_RULES:
        for allocation in ALLOCATIONS:
            result = draw(log_w, allocation, parent_rule, reps=4, seed=seed)
            counts = counts_of(result.ancestors)
            assert bool((counts.sum(-1) == size).all())
            assert not bool(counts[:, log_w == NEG_INF].any())
            assert not bool(((counts > 0) & result.reborn).any())
            if parent_rule == "excess":
                assert not bool(result.reborn[:, n >= 1 + 1e-9].any())


# --- the engine: the config axis, the trace, the final selection ----------------------------

import fvdiffusion as fv  # noqa: E402
from fvdiffusion.samplers import ConfigError  # noqa: E402
from fvdiffusion.samplers.fvd import (  # noqa: E402
    DEFAULT_ALLOCATION_DDIM, DEFAULT_ALLOCATION_STOCHASTIC, FVDConfig,
)


def test_parent_allocation_resolves_per_sampler_and_rejects_bad_values():
    assert FVDConfig(eta=1.0).parent_allocation == DEFAULT_ALLOCATION_STOCHASTIC
    assert FVDConfig(eta=0.0).parent_allocation == DEFAULT_ALLOCATION_DDIM
    assert FVDConfig(eta=0.0, parent_allocation="systematic").parent_allocation == "systematic"
    with pytest.raises(ConfigError, match="parent_allocation"):
        FVDConfig(parent_allocation="stratified")


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_every_allocation_reaches_the_sampler_and_its_final_selection(gmm2d, allocation):
    problem, den = gmm2d
    runs = {a: fv.sample("fvd", den, problem.reward, n_particles=64, num_steps=10, seed=4, parent_allocation=a,
                         rebirth_noise=0.0) for a in ALLOCATIONS}
    result = runs[allocation]
    assert result.config["parent_allocation"] == allocation
    # switch sensitivity: the allocation changes the run's lineage
    for other in [a for a in ALLOCATIONS if a != allocation]:
        assert any(not torch.equal(p, q) for p, q in zip(result.lineage.parents, runs[other].lineage.parents))
    # the final selection (step 0) runs with the configured allocation too
    assert result.lineage.steps[-1] == 0


def test_final_selection_uses_the_configured_allocation(monkeypatch, gmm2d):
    problem, den = gmm2d
    seen = []
    original = selection.fleming_viot

    def spy(*args, **kwargs):
        seen.append(kwargs.get("allocation"))
        return original(*args, **kwargs)

    monkeypatch.setitem(selection.SCHEMES, "fleming_viot", spy)
    fv.sample("fvd", den, problem.reward, n_particles=32, num_steps=4, seed=0, parent_allocation="systematic")
    assert seen and set(seen) == {"systematic"}


@pytest.mark.parametrize("method,options", [("fvd", {}), ("fvd", {"parent_allocation": "systematic"}),
                                            ("smc", {}), ("smc", {"scheme": "systematic"}), ("vasr", {})])
def test_trace_reports_the_offspring_variance_of_every_selection(gmm2d, method, options):
    problem, den = gmm2d
    result = fv.sample(method, den, problem.reward, n_particles=64, num_steps=8, seed=1, **options)
    selected = [row for row in result.trace if row.selected]
    assert selected and all(row.offspring_var >= 0.0 for row in selected)
    assert any(row.offspring_var > 0.0 for row in selected)
    assert all(row.offspring_var == 0.0 for row in result.trace if not row.selected)


def test_systematic_allocation_lowers_the_engine_offspring_variance(gmm2d):
    problem, den = gmm2d
    mean_var = {}
    for allocation in ("multinomial", "systematic"):
        rows = [row.offspring_var for seed in range(4)
                for row in fv.sample("fvd", den, problem.reward, n_particles=128, num_steps=10, seed=seed,
                                     parent_allocation=allocation, rebirth_noise=0.0).trace if row.selected]
        mean_var[allocation] = sum(rows) / len(rows)
    assert mean_var["systematic"] < 0.8 * mean_var["multinomial"], mean_var
