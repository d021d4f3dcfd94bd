"""Distances to exact Gaussian-mixture targets."""

import math

import pytest
import torch

from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture, mixture_cov, mixture_mean
from fvdiffusion.metrics.targets import (
    REFERENCE_SIZE,
    cov_error,
    evaluate_against_target,
    mass_on_component,
    mean_error,
    sliced_wasserstein2,
)
from fvdiffusion.testbeds import toy_problem



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- sliced W2


def test_sliced_w2_is_zero_for_identical_and_permuted_sets():
    x = torch.randn(300, 3, generator=gen(0))
    assert sliced_wasserstein2(x, x) == 0.0
    assert sliced_wasserstein2(x, x[torch.randperm(300, generator=gen(1))]) == pytest.approx(0.0, abs=1e-12)
    # a set repeated twice is the same empirical law: the unequal-size path must see that too
    assert sliced_wasserstein2(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)


def test_sliced_w2_known_values_in_one_dimension():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert sliced_wasserstein2(x, x + 0.7) == pytest.approx(0.7, rel=1e-6)
    # Quantile functions 0|1 (at u = 1/2) and 0|0.5|1 (at 1/3, 2/3) differ by 0.5 on (1/3, 2/3]:
    # W2² = 0.25 · 1/3 = 1/12.
    two, three = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein2(two, three) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)


def test_sliced_w2_of_a_shift_is_its_norm_over_sqrt_dim():
    # For a pure shift δ every projection moves by θᵀδ, and E[(θᵀδ)²] = |δ|²/D on the sphere.
    dim = 4
    x = torch.randn(500, dim, generator=gen(2))
    delta = torch.tensor([0.6, -0.3, 0.0, 0.9])
    sw = sliced_wasserstein2(x, x + delta, n_projections=4096, seed=3)
    assert sw == pytest.approx(float(delta.norm()) / math.sqrt(dim), rel=0.03)


def test_sliced_w2_is_symmetric_and_seeded():
    x = torch.randn(200, 2, generator=gen(4))
    y = torch.randn(333, 2, generator=gen(5)) * 1.5 + 0.2
    assert sliced_wasserstein2(x, y, seed=7) == pytest.approx(sliced_wasserstein2(y, x, seed=7), rel=1e-12)
    assert sliced_wasserstein2(x, y, seed=7) == sliced_wasserstein2(x, y, seed=7)
    assert sliced_wasserstein2(x, y, seed=7) != sliced_wasserstein2(x, y, seed=8)


def test_sliced_w2_rejects_bad_input():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein2(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein2(x, x, n_projections=0)
    with pytest.raises(ValueError, match="NaN"):
        sliced_wasserstein2(x, torch.full((5, 2), math.nan))


# ---------------------------------------------------------------- moments and mass


def test_mixture_moments_match_a_large_sample():
    m = toy_problem("gmm2d-base").mixture
    x = m.sample(200_000, gen(6), dtype=torch.float64)
    assert torch.allclose(mixture_mean(m), x.mean(0), atol=0.01)
    assert torch.allclose(mixture_cov(m), torch.cov(x.T), atol=0.01)
    assert mean_error(x, m) < 0.01 and cov_error(x, m) < 0.01


def test_mean_and_cov_error_see_shifts_and_scales():
    m = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    x = torch.randn(1000, 2, generator=gen(7), dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T  # sample mean 0, sample cov I exactly
    assert mean_error(x, m) == pytest.approx(0.0, abs=1e-12) and cov_error(x, m) == pytest.approx(0.0, abs=1e-12)
    assert mean_error(x + torch.tensor([0.3, 0.4], dtype=torch.float64), m) == pytest.approx(0.5, rel=1e-12)
    assert cov_error(2 * x, m) == pytest.approx(3.0, rel=1e-12)  # ‖4I − I‖_F / ‖I‖_F


def test_mass_on_component():
    m = toy_problem("gmm2d-base").mixture
    assert mass_on_component(m.means, m, 2) == pytest.approx(0.2)  # each mean belongs to its own component
    x = m.restrict(4).sample(2000, gen(8))
    assert mass_on_component(x, m, 4) > 0.99
    x = m.sample(20_000, gen(9))
    assert mass_on_component(x, m, 4) == pytest.approx(float(m.weights[4]), abs=0.01)
    with pytest.raises(ValueError, match="component"):
        mass_on_component(x, m, 5)


# ---------------------------------------------------------------- report


def test_exact_samples_score_at_the_floor_and_a_wrong_law_does_not():
    p = toy_problem("gmm2d-component")
    exact = p.target.sample(1000, gen(10))
    report = evaluate_against_target(exact, p, seed=1)
    assert report.n_samples == 1000
    assert 0.5 < report.floor_ratio < 1.6
    assert report.mass_on_target > 0.99 and report.exact_mass_on_target > 0.99
    assert report.mean_error < 0.05 and report.cov_error < 0.2
    # Sampling the untilted mixture instead of the target: far from the floor, little target mass.
    wrong = evaluate_against_target(p.mixture.sample(1000, gen(11)), p, seed=1)
    assert wrong.floor_ratio > 10 and wrong.mass_on_target < 0.2
    assert set(report.as_dict()) >= {"sliced_w2", "exact_floor", "floor_ratio", "mass_on_target"}


def test_report_is_deterministic_and_mass_is_none_without_a_target_component():
    p = toy_problem("gmm8d-linear")
    x = p.target.sample(500, gen(12))
    a, b = evaluate_against_target(x, p, seed=3), evaluate_against_target(x, p, seed=3)
    assert a == b
    assert a.mass_on_target is None and a.exact_mass_on_target is None
    # the floor shrinks with N as an exact sample approaches the REFERENCE_SIZE reference set
    big = evaluate_against_target(p.target.sample(4000, gen(13)), p, seed=3)
    assert big.exact_floor < a.exact_floor
    assert REFERENCE_SIZE >= 8192
    with pytest.raises(ValueError, match="features"):
        evaluate_against_target(torch.zeros(10, 3), p)
    with pytest.raises(ValueError, match="n_floor_draws"):
        evaluate_against_target(x, p, n_floor_draws=0)
