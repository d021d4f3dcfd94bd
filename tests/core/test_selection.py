"""Statistics and edge cases of the selection schemes.

Many-draw checks select 5000 independent copies of one small population in a single
batched call (rows are independent populations), so they run in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdiffusion import selection
from fvdiffusion.selection import SCHEMES, Selection, get_scheme, offspring_to_ancestors

ALL_SCHEMES = list(SCHEMES)
REPS = 5000
NEG_INF = float("-inf")

SKEWED = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.5, 1.1, NEG_INF, -2.5], dtype=torch.float64)
SPREAD = torch.tensor([4.0, -3.0, 1.5, -6.0, 3.5, 0.0, -1.0, -9.0], dtype=torch.float64)



def select(scheme: str, log_w: torch.Tensor, reps: int = REPS, seed: int = 0) -> Selection:
    generator = torch.Generator().manual_seed(seed)
    return get_scheme(scheme)(log_w.expand(reps, log_w.shape[-1]), generator)


def offspring_counts(ancestors: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(ancestors).scatter_add_(-1, ancestors, torch.ones_like(ancestors))


def expected_offspring(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.shape[-1] * torch.softmax(log_w.double(), dim=-1)


def assert_valid(result: Selection, size: int) -> None:
    assert result.ancestors.dtype == torch.long and result.reborn.dtype == torch.bool
    assert result.ancestors.shape == result.reborn.shape and result.ancestors.shape[-1] == size
    assert bool(((result.ancestors >= 0) & (result.ancestors < size)).all())
    assert torch.equal(result.reborn, result.ancestors != torch.arange(size))


@pytest.mark.parametrize("log_w", [SKEWED, SPREAD], ids=["skewed", "spread"])
@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_mean_offspring_is_n_times_weight(scheme, log_w):
    result = select(scheme, log_w)
    assert_valid(result, 8)
    counts = offspring_counts(result.ancestors).double()
    assert bool((counts.sum(-1) == 8).all())
    standard_error = counts.std(0) / math.sqrt(REPS)
    error = (counts.mean(0) - expected_offspring(log_w)).abs()
    # The absolute slack covers particles too rare (n_i ~ 1e-5) to be drawn in REPS tries.
    assert bool((error <= 5 * standard_error + 1e-3).all()), (scheme, error, standard_error)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_zero_weight_particles_are_never_ancestors_and_always_replaced(scheme):
    log_w = torch.tensor([NEG_INF, 0.5, NEG_INF, -1.0, 2.0, NEG_INF])
    result = select(scheme, log_w, reps=2000)
    dead = torch.tensor([0, 2, 5])
    assert not bool(torch.isin(result.ancestors, dead).any())
    assert bool(result.reborn[:, dead].all())


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual", "fleming_viot", "killing"])
def test_uniform_weights_keep_every_particle(scheme):
    result = select(scheme, torch.full((8,), -3.7), reps=2000)
    assert torch.equal(result.ancestors, torch.arange(8).expand(2000, 8))
    assert not bool(result.reborn.any())


def test_multinomial_on_uniform_weights_does_replace_some():
    assert bool(select("multinomial", torch.zeros(8), reps=100).reborn.any())


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
@pytest.mark.parametrize(
    "log_w",
    [
        torch.tensor([NEG_INF, NEG_INF, 0.0, NEG_INF, NEG_INF]),
        torch.tensor([-1e4, -1e4, 1e4, -1e30, 0.0], dtype=torch.float32),
    ],
    ids=["neg-inf", "float32-spread"],
)
def test_one_hot_weights_put_every_offspring_on_that_particle(scheme, log_w):
    result = select(scheme, log_w, reps=500)
    assert bool((result.ancestors == 2).all())


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_float32_with_huge_spreads_gives_valid_indices(scheme):
    rows = torch.tensor(
        [
            [1e4, -1e4, -1e30, 0.0, 3e38, -3e38, NEG_INF, 1e4],
            [-1e30, -1e30, -1e30, -1e30, -1e30, -1e30, -1e30, -1e30],
            [1e-30, 0.0, -1e-30, 1e-38, 0.0, 0.0, 0.0, 0.0],
            [-1e4, -1e4 + 1, -1e4 + 2, NEG_INF, -1e4, -1e4, -1e4, -1e4],
        ],
        dtype=torch.float32,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        result = get_scheme(scheme)(rows, generator)
        assert_valid(result, 8)
        assert bool((offspring_counts(result.ancestors).sum(-1) == 8).all())
        assert bool((result.ancestors[0] == 4).all())  # 3e38 dominates the first row
        assert not bool((result.ancestors[3] == 3).any())
    assert not bool(torch.isnan(selection.normalize(rows)).any())


def test_fleming_viot_has_lower_offspring_variance_than_multinomial():
    fv = offspring_counts(select("fleming_viot", SKEWED).ancestors).double()
    mn = offspring_counts(select("multinomial", SKEWED).ancestors).double()
    # Multinomial's exact total variance is Σ n_i (1 − n_i / N); check it too so the
    # comparison is against a correct baseline.
    n = expected_offspring(SKEWED)
    assert mn.var(0).sum().item() == pytest.approx((n * (1 - n / 8)).sum().item(), rel=0.05)
    assert fv.var(0).sum() < 0.6 * mn.var(0).sum()


@pytest.mark.parametrize("log_w", [SKEWED, SPREAD], ids=["skewed", "spread"])
def test_fleming_viot_expected_deaths_is_n_times_total_variation(log_w):
    deaths = select("fleming_viot", log_w).reborn.sum(-1).double()
    weights = torch.softmax(log_w.double(), dim=0)
    expected = 8 * 0.5 * (weights - 1 / 8).abs().sum().item()
    assert abs(deaths.mean().item() - expected) <= 5 * deaths.std().item() / math.sqrt(REPS)


@pytest.mark.parametrize("log_w", [SKEWED, SPREAD], ids=["skewed", "spread"])
def test_killing_replaces_more_than_fleming_viot(log_w):
    # FV's replacements are the minimum any unbiased scheme can achieve in expectation;
    # killing's exceed them (by less than its deaths: a dead slot may redraw itself).
    fv = select("fleming_viot", log_w).reborn.sum(-1).double()
    killed = select("killing", log_w).reborn.sum(-1).double()
    standard_error = math.sqrt((fv.var() + killed.var()).item() / REPS)
    assert killed.mean() > fv.mean() + 3 * standard_error


def test_no_scheme_replaces_fewer_than_fleming_viot_on_average():
    # Any unbiased scheme has P(count_i = 0) ≥ 1 − N·W_i, which FV attains.
    floor = select("fleming_viot", SPREAD).reborn.sum(-1).double().mean()
    for scheme in ALL_SCHEMES:
        assert select(scheme, SPREAD).reborn.sum(-1).double().mean() >= floor - 0.05


def test_fleming_viot_survivors_keep_their_slot():
    n = expected_offspring(SPREAD)
    result = select("fleming_viot", SPREAD, reps=2000)
    # Particles with n_i ≥ 1 survive surely; the others survive with probability n_i.
    assert not bool(result.reborn[:, n >= 1].any())
    kept = (~result.reborn[:, n < 1]).double().mean(0)
    assert torch.allclose(kept, n[n < 1], atol=5 * 0.5 / math.sqrt(2000))


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_same_seed_same_result(scheme):
    first = select(scheme, SKEWED, reps=50, seed=7)
    again = select(scheme, SKEWED, reps=50, seed=7)
    other = select(scheme, SKEWED, reps=50, seed=8)
    assert torch.equal(first.ancestors, again.ancestors)
    assert not torch.equal(first.ancestors, other.ancestors)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_single_particle_and_one_dimensional_input(scheme):
    generator = torch.Generator().manual_seed(0)
    one = get_scheme(scheme)(torch.tensor([-5.0]), generator)
    assert torch.equal(one.ancestors, torch.tensor([0])) and not bool(one.reborn.any())
    flat = get_scheme(scheme)(SKEWED.float(), generator)
    assert flat.ancestors.shape == (8,)
    assert_valid(flat, 8)


def test_offspring_to_ancestors_stable_arrangement():
    ancestors = offspring_to_ancestors(torch.tensor([0, 3, 1, 0, 0, 2]))
    assert ancestors.tolist() == [1, 1, 2, 1, 5, 5]
    batched = offspring_to_ancestors(torch.tensor([[2, 0, 1], [0, 0, 3]]))
    assert batched.tolist() == [[0, 0, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="counts"):
        offspring_to_ancestors(torch.tensor([2, 2, 0]))


def test_birth_mass_falls_back_to_weights_when_rounding_leaves_no_excess():
    # Every n_j ≤ 1 (rounding), so a death would leave no excess to draw a parent from.
    n = torch.tensor([[1.0, 1.0, 1.0 - 2.0**-52, 1.0], [1.5, 0.5, 1.0, 1.0]], dtype=torch.float64)
    mass = selection._birth_mass(n, "excess")
    assert torch.equal(mass[0], n[0])
    assert torch.equal(mass[1], torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_inverse_cdf_never_lands_on_zero_mass_even_past_the_total():
    mass = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.0, 0.75, 0.0]], dtype=torch.float64)
    # Position 1.0 equals the row total: reachable only through rounding, it must still
    # go to a particle with mass (the last one), not to the trailing zero-mass particle.
    positions = torch.tensor([[0.0, 0.5, 1.0, 0.2], [0.0, 0.25, 1.0, 0.9]], dtype=torch.float64)
    counts = selection._counts_at(mass, positions)
    assert counts.tolist() == [[0, 2, 2, 0], [1, 0, 3, 0]]


def test_normalize_and_ess():
    log_w = torch.tensor([0.0, 0.0, NEG_INF, NEG_INF], dtype=torch.float32)
    normalized = selection.normalize(log_w)
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized.exp(), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert selection.ess(log_w) == pytest.approx(0.5)
    assert selection.ess(torch.full((6,), 123.0)) == pytest.approx(1.0)
    assert selection.ess(torch.tensor([0.0, -1e4, -1e4, -1e4], dtype=torch.float32)) == pytest.approx(0.25)
    assert torch.logsumexp(selection.normalize(SPREAD), 0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "log_w, message",
    [
        (torch.tensor([0.0, float("nan")]), "NaN"),
        (torch.tensor([0.0, float("inf")]), r"\+inf"),
        (torch.tensor([NEG_INF, NEG_INF]), "-inf"),
        (torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]]), "-inf"),
        (torch.tensor([], dtype=torch.float32), "non-empty"),
        (torch.tensor([1, 2]), "floating"),
    ],
)
@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_invalid_log_weights_are_rejected(scheme, log_w, message):
    with pytest.raises(ValueError, match=message):
        get_scheme(scheme)(log_w, torch.Generator().manual_seed(0))


def test_bad_names_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"scheme.*'bogus'.*multinomial.*killing"):
        get_scheme("bogus")
    with pytest.raises(ValueError, match=r"parent_rule.*'bogus'.*excess.*weighted"):
        selection.fleming_viot(SKEWED, torch.Generator(), parent_rule="bogus")
    with pytest.raises(TypeError, match="generator"):
        selection.systematic(SKEWED, None)
    with pytest.raises(ValueError, match="log_w"):
        selection.ess(SKEWED.expand(2, 8))


def test_registry_names():
    assert set(SCHEMES) == {"multinomial", "systematic", "stratified", "residual", "fleming_viot", "killing"}
    assert get_scheme("killing") is selection.killing


log_weight_vectors = st.lists(
    st.one_of(st.floats(min_value=-60, max_value=60), st.just(NEG_INF)), min_size=1, max_size=12
).filter(lambda values: any(v != NEG_INF for v in values))


@settings(max_examples=40, deadline=None)
@given(values=log_weight_vectors, seed=st.integers(0, 2**31 - 1))
def test_property_every_scheme_gives_a_valid_stable_selection(values, seed):
    log_w = torch.tensor(values, dtype=torch.float64)
    size = log_w.numel()
    n = expected_offspring(log_w)
    for scheme in ALL_SCHEMES:
        result = select(scheme, log_w, reps=4, seed=seed)
        assert_valid(result, size)
        counts = offspring_counts(result.ancestors)
        assert bool((counts.sum(-1) == size).all())
        assert not bool(counts[:, log_w == NEG_INF].any())
        # Stable arrangement: a particle with offspring keeps its own slot.
        assert not bool(((counts > 0) & result.reborn).any())
        if scheme == "systematic":
            assert bool(((counts >= torch.floor(n - 1e-9)) & (counts <= torch.ceil(n + 1e-9))).all())
        if scheme == "residual":
            assert bool((counts >= torch.floor(n - 1e-9)).all())
        if scheme == "fleming_viot":
            assert not bool(result.reborn[:, n >= 1 + 1e-9].any())
