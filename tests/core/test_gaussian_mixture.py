"""The exact toy: Gaussian mixture laws, exact denoiser, analytic rewards, toy problems."""

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.denoisers.gaussian_mixture import GaussianMixture, GaussianMixtureDenoiser, mixture_cov, mixture_mean
from fvdiffusion.metrics.targets import evaluate_against_target
from fvdiffusion.rewards.analytic import ComponentPosteriorReward, LinearReward
from fvdiffusion.rewards.base import Reward
from fvdiffusion.schedule import VPSchedule, ddim_step, to_x0_eps
from fvdiffusion.testbeds import TOY_PROBLEMS, ToyProblem, base_problem, mixture_2d, mixture_nd, toy_problem



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return mixture_2d()


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weights": [0.5, -0.5]}, "weights"),
        ({"weights": [0.5, 0.4]}, "weights"),
        ({"weights": [[0.5, 0.5]]}, "weights"),
        ({"means": torch.zeros(3, 2)}, "means"),
        ({"covs": torch.eye(2).expand(2, 2, 2) + torch.tensor([[0.0, 0.5], [0.0, 0.0]])}, "covs"),
        ({"covs": torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])}, "covs"),
        ({"covs": torch.eye(3).expand(2, 3, 3)}, "covs"),
        ({"means": torch.tensor([[0.0, math.nan], [1.0, 1.0]])}, "means"),
    ],
)
def test_invalid_mixture_names_the_field(kwargs, field):
    args = {"weights": [0.5, 0.5], "means": torch.zeros(2, 2), "covs": torch.eye(2).expand(2, 2, 2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        GaussianMixture(**args)


def test_parameters_are_float64_and_weights_renormalised():
    m = GaussianMixture(torch.tensor([0.3, 0.7 + 1e-8]), torch.zeros(2, 1), torch.ones(2, 1, 1))
    assert m.weights.dtype == m.means.dtype == m.covs.dtype == torch.float64
    assert float(m.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    assert (m.n_components, m.dim) == (2, 1)


# ---------------------------------------------------------------- sampling and densities


def test_sample_is_seeded_and_labels_follow_weights(gmm):
    a = gmm.sample_with_labels(40_000, gen(0))
    b = gmm.sample_with_labels(40_000, gen(0))
    assert a.x.shape == (40_000, 2) and a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    freq = torch.bincount(a.labels, minlength=5).double() / 40_000
    assert torch.allclose(freq, gmm.weights, atol=0.01)
    # each component's draws have that component's mean
    for k in range(5):
        assert torch.allclose(a.x[a.labels == k].double().mean(0), gmm.means[k], atol=0.02)


def test_log_prob_and_posterior_match_scipy(gmm):
    x = gmm.sample(50, gen(1), dtype=torch.float64)
    dens = torch.stack(
        [
            torch.from_numpy(multivariate_normal(gmm.means[k].numpy(), gmm.covs[k].numpy()).pdf(x.numpy()))
            for k in range(5)
        ],
        dim=1,
    ) * gmm.weights
    assert torch.allclose(gmm.log_prob(x), dens.sum(1).log(), rtol=1e-10)
    post = gmm.component_log_posterior(x).exp()
    assert torch.allclose(post, dens / dens.sum(1, keepdim=True), atol=1e-10)
    assert torch.allclose(post.sum(1), torch.ones(50, dtype=torch.float64), atol=1e-12)


def test_posterior_is_finite_far_from_all_components(gmm):
    x = torch.tensor([[80.0, -60.0], [1e3, 1e3]])
    post = gmm.component_log_posterior(x)
    assert torch.all(torch.isfinite(post))
    assert torch.allclose(post.exp().sum(1), torch.ones(2, dtype=torch.float64))


def test_noised_matches_forward_process_moments(gmm):
    a = 0.4
    x0 = gmm.sample(100_000, gen(2), dtype=torch.float64)
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=gen(3), dtype=torch.float64)
    noisy = gmm.noised(a)
    assert torch.allclose(x_t.mean(0), mixture_mean(noisy), atol=0.01)
    assert torch.allclose(torch.cov(x_t.T), mixture_cov(noisy), atol=0.015)
    with pytest.raises(ValueError, match="alpha_bar"):
        gmm.noised(1.5)


# ---------------------------------------------------------------- exact posterior mean


@pytest.mark.parametrize("alpha_bar", [0.2, 0.5, 0.8])
def test_posterior_mean_matches_importance_sampling(gmm, alpha_bar):
    # E[x0 | x_t] = E_p[x0 N(x_t; √ᾱ x0, (1−ᾱ)I)] / E_p[N(...)], estimated from prior draws.
    x0 = gmm.sample(200_000, gen(4), dtype=torch.float64)
    x_t = gmm.noised(alpha_bar).sample(6, gen(5), dtype=torch.float64)
    log_w = -((x_t[:, None, :] - math.sqrt(alpha_bar) * x0[None]) ** 2).sum(-1) / (2 * (1 - alpha_bar))
    w = torch.softmax(log_w, dim=1)
    assert torch.all(1 / (w**2).sum(1) > 500)  # enough effective draws for the tolerance below
    estimate = w @ x0
    assert torch.allclose(gmm.posterior_mean_x0(x_t, alpha_bar), estimate, atol=0.03)


def test_single_gaussian_posterior_mean_is_the_conjugate_formula():
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    m = GaussianMixture(torch.ones(1), mu[None], cov[None])
    a = 0.3
    x_t = torch.randn(7, 2, generator=gen(6), dtype=torch.float64)
    # Bayes with precisions: x_t | x0 ~ N(√a x0, (1−a)I)
    precision = torch.linalg.inv(cov) + a / (1 - a) * torch.eye(2, dtype=torch.float64)
    rhs = (torch.linalg.inv(cov) @ mu)[None] + math.sqrt(a) / (1 - a) * x_t
    expected = torch.linalg.solve(precision, rhs.T).T
    assert torch.allclose(m.posterior_mean_x0(x_t, a), expected, atol=1e-12)


def test_posterior_mean_limits(gmm):
    x_t = torch.tensor([[0.3, -0.2], [2.0, 1.0], [-40.0, 25.0]], dtype=torch.float64)
    assert torch.allclose(gmm.posterior_mean_x0(x_t, 1.0), x_t, atol=1e-12)
    assert torch.allclose(gmm.posterior_mean_x0(x_t, 1 - 1e-9), x_t, atol=1e-6)
    mean = mixture_mean(gmm).expand(3, 2)
    assert torch.allclose(gmm.posterior_mean_x0(x_t, 0.0), mean, atol=1e-12)
    assert torch.allclose(gmm.posterior_mean_x0(x_t[:2], 1e-10), mean[:2], atol=1e-4)
    far = gmm.posterior_mean_x0(torch.tensor([[500.0, -300.0]]), 0.5)
    assert torch.all(torch.isfinite(far))


def test_posterior_mean_per_row_alpha_bar(gmm):
    x_t = torch.randn(6, 2, generator=gen(7), dtype=torch.float64)
    a = torch.tensor([0.1, 0.9, 0.1, 0.5, 0.9, 0.5], dtype=torch.float64)
    out = gmm.posterior_mean_x0(x_t, a)
    for i in range(6):
        assert torch.allclose(out[i], gmm.posterior_mean_x0(x_t[i : i + 1], float(a[i]))[0], atol=1e-14)
    with pytest.raises(ValueError, match="alpha_bar"):
        gmm.posterior_mean_x0(x_t, a[:3])
    with pytest.raises(ValueError, match="x_t"):
        gmm.posterior_mean_x0(torch.zeros(6, 3), 0.5)


# ---------------------------------------------------------------- exact tilts


def test_tilt_linear_matches_reweighted_samples(gmm):
    a = torch.tensor([0.8, -0.6], dtype=torch.float64)
    draws = gmm.sample_with_labels(300_000, gen(8), dtype=torch.float64)
    w = torch.softmax(draws.x @ a, dim=0)
    tilted = gmm.tilt_linear(a)
    mean = w @ draws.x
    cov = (draws.x - mean).T @ ((draws.x - mean) * w[:, None])
    assert torch.allclose(mixture_mean(tilted), mean, atol=0.01)
    assert torch.allclose(mixture_cov(tilted), cov, atol=0.02)
    label_mass = torch.zeros(5, dtype=torch.float64).index_add_(0, draws.labels, w)
    assert torch.allclose(tilted.weights, label_mass, atol=0.01)
    assert not torch.allclose(tilted.weights, gmm.weights, atol=0.05)  # the tilt really moves mass
    with pytest.raises(ValueError, match="a must"):
        gmm.tilt_linear(torch.ones(3))


def test_restrict_is_the_component_posterior_tilt(gmm):
    # p(x) · p(k|x) = w_k N_k(x): normalised, it is component k alone.
    one = gmm.restrict(4)
    x = torch.randn(20, 2, generator=gen(9), dtype=torch.float64)
    lhs = gmm.log_prob(x) + gmm.component_log_posterior(x)[:, 4] - math.log(float(gmm.weights[4]))
    assert torch.allclose(one.log_prob(x), lhs, atol=1e-10)
    with pytest.raises(ValueError, match="component"):
        gmm.restrict(5)


# ---------------------------------------------------------------- denoiser and rewards


def test_denoiser_is_exact_per_row_and_keeps_dtype(gmm):
    schedule = VPSchedule.linear()
    den = GaussianMixtureDenoiser(gmm, schedule)
    assert isinstance(den, Denoiser)
    assert den.prediction_type == "x0" and den.sample_shape == (2,)
    x_t = torch.randn(4, 2, generator=gen(10))
    t = torch.tensor([999, 500, 10, -1])
    out = den(x_t, t)
    assert out.dtype == torch.float32 and out.shape == (4, 2)
    expected = gmm.posterior_mean_x0(x_t, schedule.alpha_bar(t))
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert torch.allclose(out[3], x_t[3])  # t = −1 is clean data
    assert den(x_t.double(), t).dtype == torch.float64
    with pytest.raises(ValueError, match="t must"):
        den(x_t, torch.tensor([1000, 0, 0, 0]))
    with pytest.raises(ValueError, match="x_t"):
        den(torch.zeros(4, 3), t)


def test_component_posterior_reward(gmm):
    x = gmm.sample(64, gen(11))
    rewards = [ComponentPosteriorReward(gmm, k) for k in range(5)]
    assert all(isinstance(r, Reward) for r in rewards)
    values = torch.stack([r(x) for r in rewards], dim=1)
    assert values.shape == (64, 5) and values.dtype == torch.float32
    assert torch.allclose(values.exp().sum(1), torch.ones(64), atol=1e-5)
    for bad in (5, -1, 1.0, True):
        with pytest.raises(ValueError, match="component"):
            ComponentPosteriorReward(gmm, bad)


def test_linear_reward():
    r = LinearReward(torch.tensor([1.0, -2.0]))
    assert isinstance(r, Reward)
    x = torch.tensor([[1.0, 1.0], [0.5, -1.0]])
    assert torch.equal(r(x), torch.tensor([-1.0, 2.5]))
    with pytest.raises(ValueError, match="features"):
        r(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="a must"):
        LinearReward(torch.ones(2, 2))


# ---------------------------------------------------------------- toy problems


def test_toy_problem_registry():
    for name in TOY_PROBLEMS:
        p = toy_problem(name)
        assert isinstance(p, ToyProblem) and p.name == name and p.target.dim == p.dim
    with pytest.raises(ValueError, match="gmm2d-component"):
        toy_problem("gmm3d-component")
    base = base_problem("gmm8d-linear")
    assert base.reward is None and base.lam == 0 and base.target is base.mixture


def test_component_problem_targets_a_low_weight_component():
    for name in ("gmm2d-component", "gmm8d-component", "gmm16d-component"):
        p = toy_problem(name)
        k = p.target_component
        assert 0.1 <= float(p.mixture.weights[k]) <= 0.2
        assert p.target.n_components == 1 and torch.equal(p.target.means[0], p.mixture.means[k])
        x = p.mixture.sample(16, gen(12))
        assert torch.allclose(p.reward(x), p.mixture.component_log_posterior(x)[:, k].float())


def test_linear_problem_target_is_the_exact_tilt():
    p = toy_problem("gmm2d-linear")
    expected = p.mixture.tilt_linear(p.reward.a)
    assert torch.allclose(p.target.weights, expected.weights) and torch.allclose(p.target.means, expected.means)


@pytest.mark.parametrize("mixture", [mixture_2d(), mixture_nd(8), mixture_nd(16)], ids=["2d", "8d", "16d"])
def test_components_separate_when_clean_and_overlap_at_half_noise(mixture):
    def mean_max_responsibility(alpha_bar: float) -> float:
        noisy = mixture.noised(alpha_bar)
        x = noisy.sample(4000, gen(13), dtype=torch.float64)
        return float(noisy.component_log_posterior(x).exp().max(1).values.mean())

    assert mean_max_responsibility(1.0) > 0.99
    assert mean_max_responsibility(0.5) < 0.75


def test_toy_problem_validates_fields(gmm):
    with pytest.raises(ValueError, match="lam"):
        ToyProblem("x", gmm, None, gmm, None, 1.0, 2)
    with pytest.raises(ValueError, match="dim"):
        ToyProblem("x", gmm, None, gmm, None, 0.0, 3)
    with pytest.raises(ValueError, match="target_component"):
        ToyProblem("x", gmm, None, gmm, 7, 0.0, 2)
    with pytest.raises(ValueError, match="dim"):
        mixture_nd(4)


# ---------------------------------------------------------------- end to end


def _ddpm_samples(mixture: GaussianMixture, n: int, num_steps: int, seed: int) -> torch.Tensor:
    schedule = VPSchedule.linear()
    den = GaussianMixtureDenoiser(mixture, schedule)
    g = gen(seed)
    timesteps = schedule.timesteps(num_steps).tolist()
    x = torch.randn(n, mixture.dim, generator=g)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        ab, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        pred = to_x0_eps(den(x, torch.full((n,), t)), x, ab, "x0")
        x = ddim_step(pred.x0, pred.eps, ab, ab_prev, eta=1.0, noise=torch.randn(x.shape, generator=g))
    return x


def test_exact_denoiser_ddpm_reaches_the_exact_sample_floor():
    problem = base_problem("gmm2d-base")
    report = evaluate_against_target(_ddpm_samples(problem.mixture, 2000, 200, seed=0), problem, seed=0)
    assert report.sliced_w2 < 2 * report.exact_floor
    assert report.cov_error < 0.1
    # Negative control: the same process with the wrong component weights is far from the floor.
    m = problem.mixture
    wrong = GaussianMixture(torch.full((5,), 0.2), m.means, m.covs)
    bad = evaluate_against_target(_ddpm_samples(wrong, 2000, 200, seed=0), problem, seed=0)
    assert bad.sliced_w2 > 3 * bad.exact_floor
