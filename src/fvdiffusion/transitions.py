"""Transitions: how a population moves from x_t to the next point of the grid, given the denoiser's output.

The run context owns one :class:`Transition`, built once from the config by :func:`make_transition`
(the only place that reads ``eta``, ``transition`` and the x̂0 processing options). Every method moves
particles through it: the driver's step, svdd's candidates and dts's expansions.

A transition sees the step (its ᾱ values, and the grid for multistep solvers), the particles' x_t,
their (x̂0, ε̂) and their *history*: per-particle tensors kept in the population
(``ParticleState.history``), so that a selection carries a clone's history with it. A particle whose
x_t was changed by something other than a transition (rebirth noise, Langevin moves) has its history
restarted (:func:`restart_history`): its next step is first order.

Transitions (σ = √((1−ᾱ)/ᾱ) is the variance-exploding noise level, λ = −log σ):

* ``ddim`` — DDIM(η): x' = √ᾱ' x̂0 + √(1−ᾱ'−s²) ε̂ + s ξ with s = η·σ_DDPM; η = 1 is DDPM ancestral, 0 the
  deterministic DDIM ODE step. The engine's historical step, bit for bit.
* ``ddpm`` — the DDPM posterior q(x' | x_t, x̂0) written as diffusers' ``DDPMScheduler`` does (mean from
  x̂0 and x_t, "fixed_small" variance). Equal to DDIM(1) in exact arithmetic; η must be 1.
* ``euler`` — Euler in σ (k-diffusion's and diffusers' ``EulerDiscreteScheduler``); η > 0 adds the
  ancestral noise σ_up = η·√(σ'²(σ²−σ'²)/σ²) (η = 1: ``EulerAncestralDiscreteScheduler``). On the
  same grid this is DDIM(η) written in σ (σ_up is DDIM's noise, σ_down its direction), equal in
  exact arithmetic and tested so; it is here to step as those schedulers do, in their coordinates.
* ``dpmpp_2m`` — DPM-Solver++(2M) with the midpoint correction, data prediction (diffusers'
  ``DPMSolverMultistepScheduler``, ``algorithm_type="dpmsolver++"``, order 2); η > 0 is the SDE variant
  (η = 1: ``algorithm_type="sde-dpmsolver++"``). History: the previous step's x̂0. The first step, a
  restarted particle and the last step (onto σ = 0) are first order.
* ``unipc`` — UniPC (diffusers' ``UniPCMultistepScheduler`` at its defaults: B(h) = e^h − 1 ("bh2"),
  order 2, data prediction, corrector on, lower order at the last step). Each step first corrects
  x_t with the denoiser's output *at* x_t (UniC: the model is not called again), then predicts the
  next point (UniP). History: the two previous x̂0, the previous corrected x and how many of them a
  particle may use; a restarted particle takes no corrector and a first-order predictor; the last
  step (onto σ = 0) lands on x̂0. An ODE solver: η must be 0.

x̂0 processing (where the user's scheduler asks for it): ``clip_x0`` clamps x̂0 to [−c, c];
``dynamic_threshold`` (Imagen's dynamic thresholding) clamps each sample to its ``ratio``-quantile of
|x̂0| (at least 1, at most ``dynamic_threshold_max``) and divides by it. ε̂ is left as the model gave
it, as diffusers' ``DDIMScheduler.step`` leaves it (``use_clipped_model_output=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fvdiffusion.config import TRANSITIONS, CommonConfig, ConfigError
from fvdiffusion.schedule import Prediction, StepGrid, StepInfo, _as, ddim_step

__all__ = ["Transition", "Moved", "make_transition", "restart_history", "TRANSITIONS", "DDIM", "DDPM", "Euler",
           "DPMSolverPP2M", "UniPC", "X0Processing"]

ORDER = "order"        # history key: how many previous outputs a particle may use (0 = first order next)
PREVIOUS_X0 = "x0_prev"
SECOND_X0 = "x0_prev2"  # UniPC: the x̂0 of two steps back
LAST_X = "x_last"       # UniPC: the previous step's (corrected) x, where its predictor started


@dataclass(frozen=True)
class Moved:
    """A transition's result: the particles at the landing point and their new history."""

    x: Tensor
    history: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class X0Processing:
    """What the user's scheduler does to x̂0 before a step: clamp, or dynamic thresholding (or neither)."""

    clip: float | None = None
    threshold_ratio: float | None = None
    threshold_max: float = 1.0

    @property
    def active(self) -> bool:
        return self.clip is not None or self.threshold_ratio is not None

    def __call__(self, x0: Tensor) -> Tensor:
        if self.threshold_ratio is not None:
            flat = x0.reshape(x0.shape[0], -1).abs().float()
            s = torch.quantile(flat, self.threshold_ratio, dim=1).clamp(min=1.0, max=self.threshold_max)
            s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            x0 = torch.clamp(x0, -s, s) / s
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0


@runtime_checkable
class Transition(Protocol):
    """One move x_t → x_{t'} of every particle; noise (when ``draws_noise``) is drawn by the caller."""

    name: str
    eta: float
    draws_noise: bool        # the caller passes one Gaussian per particle and step
    history_keys: tuple[str, ...]

    def initial_history(self, x: Tensor) -> dict[str, Tensor]:
        """The history of particles that have taken no step yet (``x`` gives rows, shape, device)."""

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        """Move ``x`` (at ``info.t``, with the denoiser's ``pred``) to ``info.t_prev``."""


def _stochastic_check(name: str, eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"invalid eta={eta!r}: expected a number in [0, 1] for transition {name!r}")


class _Single:
    """Shared parts of the one-step transitions (no history)."""

    history_keys: tuple[str, ...] = ()

    def __init__(self, eta: float, processing: X0Processing) -> None:
        _stochastic_check(self.name, eta)
        self.eta, self.processing = eta, processing

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def initial_history(self, x: Tensor) -> dict[str, Tensor]:
        return {}

    def _processed(self, x: Tensor, pred: Prediction, alpha_bar: float) -> Prediction:
        # ε̂ stays the model's, as in diffusers' DDIMScheduler.step (use_clipped_model_output=False)
        if not self.processing.active:
            return pred
        return Prediction(x0=self.processing(pred.x0), eps=pred.eps)


class DDIM(_Single):
    name = "ddim"

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        pred = self._processed(x, pred, info.alpha_bar)
        return Moved(ddim_step(pred.x0, pred.eps, info.alpha_bar, info.alpha_bar_prev, self.eta, noise))


class DDPM(_Single):
    name = "ddpm"
    draws_noise = True  # the posterior's noise, whatever η (which must be 1)

    def __init__(self, eta: float, processing: X0Processing) -> None:
        if eta != 1.0:
            raise ConfigError(f"invalid eta={eta!r} for transition 'ddpm': its noise is the DDPM posterior's "
                              f"(eta must be 1); use transition='ddim' for another eta")
        super().__init__(eta, processing)

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        a_t, a_p = info.alpha_bar, info.alpha_bar_prev
        x0 = self.processing(pred.x0) if self.processing.active else pred.x0
        beta = 1 - a_t / a_p                    # the step's β (several training steps when skipping)
        coef_x0 = math.sqrt(a_p) * beta / (1 - a_t)
        coef_xt = math.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t)
        sigma = math.sqrt(max((1 - a_p) / (1 - a_t) * beta, 0.0))
        out = _as(coef_x0, x.dtype) * x0 + _as(coef_xt, x.dtype) * x
        if sigma > 0:
            if noise is None:
                raise ValueError("transition 'ddpm': noise is required")
            out = out + _as(sigma, x.dtype) * noise
        return Moved(out)


def ve_sigma(alpha_bar: float) -> float:
    """σ = √((1−ᾱ)/ᾱ), the noise level of x/√ᾱ (0 at ᾱ = 1)."""
    return math.sqrt(max(1 - alpha_bar, 0.0) / alpha_bar)


def _lambda(alpha_bar: float) -> float:
    """λ = log(α/σ), the half log-SNR (+inf on clean data)."""
    return math.inf if alpha_bar >= 1.0 else 0.5 * math.log(alpha_bar / (1 - alpha_bar))


class Euler(_Single):
    name = "euler"

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        pred = self._processed(x, pred, info.alpha_bar)
        s, s_next = ve_sigma(info.alpha_bar), ve_sigma(info.alpha_bar_prev)
        up = min(s_next, self.eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0))) if s > 0 else 0.0
        down = math.sqrt(max(s_next**2 - up**2, 0.0))
        dtype = x.dtype
        # x/√ᾱ = x̂0 + σ ε̂; one Euler step of dx/dσ = ε̂ to σ_down, then σ_up of fresh noise
        x_ve = x / _as(math.sqrt(info.alpha_bar), dtype) + _as(down - s, dtype) * pred.eps
        if up > 0:
            if noise is None:
                raise ValueError("transition 'euler' with eta > 0: noise is required")
            x_ve = x_ve + _as(up, dtype) * noise
        return Moved(x_ve * _as(math.sqrt(info.alpha_bar_prev), dtype))


class DPMSolverPP2M:
    """DPM-Solver++(2M), midpoint form; η > 0: the SDE variant. Per-particle history: the last x̂0."""

    name = "dpmpp_2m"
    history_keys = (PREVIOUS_X0, ORDER)

    def __init__(self, eta: float, processing: X0Processing, grid: StepGrid) -> None:
        _stochastic_check(self.name, eta)
        self.eta, self.processing, self.grid = eta, processing, grid

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def initial_history(self, x: Tensor) -> dict[str, Tensor]:
        return {PREVIOUS_X0: torch.zeros_like(x), ORDER: torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)}

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        x0 = self.processing(pred.x0) if self.processing.active else pred.x0
        new_history = {PREVIOUS_X0: x0, ORDER: torch.ones(x.shape[0], dtype=x.dtype, device=x.device)}
        if info.alpha_bar_prev >= 1.0:  # onto σ = 0: x' = x̂0 (first order, as diffusers' final step)
            return Moved(x0.clone(), new_history)
        a_t = math.sqrt(info.alpha_bar_prev)
        sig_t, sig_s = math.sqrt(1 - info.alpha_bar_prev), math.sqrt(1 - info.alpha_bar)
        h = _lambda(info.alpha_bar_prev) - _lambda(info.alpha_bar)
        eta_h = self.eta * h
        dtype = x.dtype
        c_x = sig_t / sig_s * math.exp(-eta_h)
        c_d = a_t * -math.expm1(-h - eta_h)
        out = _as(c_x, dtype) * x + _as(c_d, dtype) * x0
        if info.index > 0:
            h_last = _lambda(info.alpha_bar) - _lambda(self.grid[info.index - 1].alpha_bar)
            second = _as(0.5 * c_d * h / h_last, dtype) * (x0 - history[PREVIOUS_X0])
            use = (history[ORDER] > 0).reshape(-1, *([1] * (x.ndim - 1)))
            out = torch.where(use, out + second, out)
        if self.eta > 0:
            if noise is None:
                raise ValueError("transition 'dpmpp_2m' with eta > 0: noise is required")
            out = out + _as(sig_t * math.sqrt(-math.expm1(-2 * eta_h)), dtype) * noise
        return Moved(out, new_history)


def _unipc_rhos(h: float, rk: float | None) -> tuple[float, ...]:
    """UniC's weights for the B(h) = e^h − 1 variant: order 1 without ``rk``, order 2 with it
    (the linear system of the UniPC paper's Algorithm, written out for two unknowns)."""
    if rk is None:
        return (0.5,)
    hh = -h                      # data prediction
    b_h = math.expm1(hh)
    phi_1 = b_h / hh - 1         # the φ-function terms of the B(h) system, k = 1 and 2
    phi_2 = phi_1 / hh - 0.5
    b = (phi_1 / b_h, 2 * phi_2 / b_h)
    # [[1, 1], [rk, 1]] · ρ = b
    det = 1 - rk
    return ((b[0] - b[1]) / det, (b[1] - rk * b[0]) / det)


class UniPC:
    """UniPC-2 with B(h) = e^h − 1, data prediction, corrector on (``UniPCMultistepScheduler``'s defaults).

    The predictor's second order needs the step before; the corrector's first order the previous
    point, its second order the one before that (per particle: ``history[ORDER]`` counts them).
    """

    name = "unipc"
    eta = 0.0
    draws_noise = False
    history_keys = (PREVIOUS_X0, SECOND_X0, LAST_X, ORDER)

    def __init__(self, eta: float, processing: X0Processing, grid: StepGrid) -> None:
        if eta != 0.0:
            raise ConfigError(f"invalid eta={eta!r} for transition 'unipc': an ODE solver (eta must be 0)")
        self.processing, self.grid = processing, grid

    def initial_history(self, x: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros_like(x)
        return {PREVIOUS_X0: zeros, SECOND_X0: zeros, LAST_X: zeros,
                ORDER: torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)}

    def _corrected(self, info: StepInfo, x: Tensor, x0: Tensor, history: dict[str, Tensor]) -> Tensor:
        """UniC: x_t recomputed from the previous point with the output at x_t (per particle: none,
        order 1 or order 2, by how much history it has)."""
        i, dtype = info.index, x.dtype
        if i == 0:
            return x
        a_prev = self.grid[i - 1].alpha_bar
        lam_t, lam_s = _lambda(info.alpha_bar), _lambda(a_prev)
        h = lam_t - lam_s
        alpha_t, sigma_t, sigma_s = math.sqrt(info.alpha_bar), math.sqrt(1 - info.alpha_bar), math.sqrt(1 - a_prev)
        b_h = math.expm1(-h)
        m0 = history[PREVIOUS_X0]
        base = _as(sigma_t / sigma_s, dtype) * history[LAST_X] - _as(alpha_t * b_h, dtype) * m0
        d_t = x0 - m0
        (rho,) = _unipc_rhos(h, None)
        out = base - _as(alpha_t * b_h * rho, dtype) * d_t
        count = history[ORDER].reshape(-1, *([1] * (x.ndim - 1)))
        if i >= 2:
            rk = (_lambda(self.grid[i - 2].alpha_bar) - lam_s) / h
            rho_1, rho_t = _unipc_rhos(h, rk)
            d_1 = (history[SECOND_X0] - m0) / _as(rk, dtype)
            second = base - _as(alpha_t * b_h, dtype) * (_as(rho_1, dtype) * d_1 + _as(rho_t, dtype) * d_t)
            out = torch.where(count >= 2, second, out)
        return torch.where(count >= 1, out, x)

    def step(self, info: StepInfo, x: Tensor, pred: Prediction, history: dict[str, Tensor],
             noise: Tensor | None) -> Moved:
        x0 = self.processing(pred.x0) if self.processing.active else pred.x0
        x = self._corrected(info, x, x0, history)
        count = history[ORDER]
        new_history = {PREVIOUS_X0: x0, SECOND_X0: history[PREVIOUS_X0], LAST_X: x,
                       ORDER: torch.clamp(count + 1, max=2.0)}
        if info.alpha_bar_prev >= 1.0:  # onto σ = 0: x' = x̂0 (first order, as diffusers' final step)
            return Moved(x0.clone(), new_history)
        dtype = x.dtype
        lam_t, lam_s = _lambda(info.alpha_bar_prev), _lambda(info.alpha_bar)
        h = lam_t - lam_s
        alpha_t, sigma_t, sigma_s = (math.sqrt(info.alpha_bar_prev), math.sqrt(1 - info.alpha_bar_prev),
                                     math.sqrt(1 - info.alpha_bar))
        b_h = math.expm1(-h)
        out = _as(sigma_t / sigma_s, dtype) * x - _as(alpha_t * b_h, dtype) * x0
        if info.index > 0:
            rk = (_lambda(self.grid[info.index - 1].alpha_bar) - lam_s) / h
            d_1 = (history[PREVIOUS_X0] - x0) / _as(rk, dtype)
            second = out - _as(alpha_t * b_h * 0.5, dtype) * d_1
            out = torch.where((count >= 1).reshape(-1, *([1] * (x.ndim - 1))), second, out)
        return Moved(out, new_history)


def make_transition(config: CommonConfig, grid: StepGrid) -> Transition:
    """The run's transition: the one place that reads ``eta``, ``transition`` and the x̂0 processing."""
    processing = X0Processing(clip=config.clip_x0, threshold_ratio=config.dynamic_threshold,
                              threshold_max=config.dynamic_threshold_max)
    name = config.transition
    if name == "ddim":
        return DDIM(config.eta, processing)
    if name == "ddpm":
        return DDPM(config.eta, processing)
    if name == "euler":
        return Euler(config.eta, processing)
    if name == "dpmpp_2m":
        return DPMSolverPP2M(config.eta, processing, grid)
    if name == "unipc":
        return UniPC(config.eta, processing, grid)
    raise ConfigError(f"invalid transition={name!r}: expected one of {', '.join(TRANSITIONS)}")


def is_stochastic(config: CommonConfig) -> bool:
    """Does the config's transition draw fresh noise at each step (a stochastic sampler)?"""
    return config.transition == "ddpm" or config.eta > 0


def require_stochastic_transition(config: CommonConfig, method: str) -> None:
    """Candidates drawn from a deterministic transition (η = 0) all coincide: nothing to choose from."""
    if not is_stochastic(config):
        raise ConfigError(f"invalid eta={config.eta!r}: expected > 0 for {method} (with eta = 0 every candidate "
                          f"drawn from the {config.transition} transition is the same state)")


def restart_history(history: dict[str, Tensor], restarted: Tensor) -> dict[str, Tensor]:
    """The history with the ``restarted`` particles (a bool mask over the rows) back at first order."""
    if ORDER not in history:
        return history
    order = history[ORDER]
    return {**history, ORDER: torch.where(restarted.to(order.device), torch.zeros_like(order), order)}
