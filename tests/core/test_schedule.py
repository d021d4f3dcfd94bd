import math

import pytest
import torch

from fvdiffusion.schedule import VPSchedule, ddim_sigma, ddim_step, q_sample, to_x0_eps


def test_linear_schedule_matches_closed_form():
    s = VPSchedule.linear(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4)


def test_cosine_schedule_endpoints_and_monotone():
    s = VPSchedule.cosine(1000)
    ac = s.alphas_cumprod
    assert torch.all(ac[1:] <= ac[:-1])
    assert ac[0] > 0.999 and ac[-1] < 1e-3
    # ᾱ(t) = f(t)/f(0) at the midpoint (no clipping there)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert ac[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)


def test_timesteps_descend_to_zero():
    s = VPSchedule.linear(1000)
    ts = s.timesteps(50)
    assert ts.tolist()[:2] == [980, 960] and ts[-1] == 0 and len(ts) == 50
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps(0)


def test_alpha_bar_minus_one_is_clean():
    s = VPSchedule.linear(1000)
    assert s.alpha_bar(-1).item() == 1.0
    assert s.alpha_bar(torch.tensor([0, 999])).tolist() == s.alphas_cumprod[[0, 999]].tolist()


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_conversions_roundtrip(kind):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    a = 0.37
    xt = q_sample(x0, eps, a)
    out = {"eps": eps, "x0": x0, "v": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[kind]
    pred = to_x0_eps(out, xt, a, kind)
    assert torch.allclose(pred.x0, x0) and torch.allclose(pred.eps, eps)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(torch.zeros(1), torch.zeros(1), 0.5, "score")


def test_ddpm_step_is_the_gaussian_posterior():
    # η = 1: x_prev ~ q(x_prev | x_t, x0) with mean μ̃ and variance β̃ (Ho et al. eq. 7)
    a_t, a_p = 0.5, 0.8
    beta_t = 1 - a_t / a_p
    x0, xt = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.7], dtype=torch.float64)
    eps = (xt - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    mean = math.sqrt(a_p) * beta_t / (1 - a_t) * x0 + math.sqrt(1 - beta_t) * (1 - a_p) / (1 - a_t) * xt
    var = (1 - a_p) / (1 - a_t) * beta_t
    assert ddim_sigma(a_t, a_p, 1.0).item() ** 2 == pytest.approx(var)
    mu = ddim_step(x0, eps, a_t, a_p, 1.0, torch.zeros(1, dtype=torch.float64))
    assert mu.item() == pytest.approx(mean.item())


def test_ddim_zero_eta_is_deterministic_and_needs_no_noise():
    x0, eps = torch.ones(2), torch.zeros(2)
    out = ddim_step(x0, eps, 0.5, 0.9, 0.0, None)
    assert torch.allclose(out, torch.full((2,), math.sqrt(0.9)))
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x0, eps, 0.5, 0.9, 1.0, None)


def test_last_step_returns_x0():
    x0, eps = torch.randn(4), torch.randn(4)
    out = ddim_step(x0, eps, 0.99, 1.0, 1.0, torch.randn(4))
    assert torch.allclose(out, x0)


def test_schedule_validation():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.5, 0.9]))
