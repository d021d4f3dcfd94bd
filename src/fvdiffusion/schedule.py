"""VP noise schedules and the step math shared by every sampler.

Everything is derived from ``alphas_cumprod`` (ᾱ_t): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε.
The denoiser may predict ε, x0 or v; :func:`to_x0_eps` turns any of them into the
(x̂0, ε̂) pair the samplers work with. Steps are DDIM(η): η = 1 is DDPM ancestral
sampling, η = 0 the deterministic DDIM ODE step.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("eps", "x0", "v")


@dataclass(frozen=True)
class VPSchedule:
    """A variance-preserving schedule given by ᾱ_t for t = 0 … T−1 (float64, decreasing)."""

    alphas_cumprod: Tensor

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape {tuple(ac.shape)}")
        if not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if not torch.all(ac[1:] <= ac[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        object.__setattr__(self, "alphas_cumprod", ac)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "VPSchedule":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "VPSchedule":
        # Nichol & Dhariwal: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), betas clipped at max_beta.
        def f(t: float) -> float:
            return math.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_train_timesteps)]
        return cls(torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0))

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000) -> "VPSchedule":
        if name == "linear":
            return cls.linear(num_train_timesteps)
        if name == "cosine":
            return cls.cosine(num_train_timesteps)
        raise ValueError(f"schedule: unknown name {name!r}; expected 'linear' or 'cosine'")

    def timesteps(self, num_steps: int) -> Tensor:
        """Evenly spaced sampling timesteps t_K > … > t_1 (long), ending at t = 0 ("leading" spacing)."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        stride = T // num_steps
        return torch.arange(0, num_steps * stride, stride, dtype=torch.long).flip(0)

    def alpha_bar(self, t: int | Tensor) -> Tensor:
        """ᾱ_t; t = −1 means 'clean data' (ᾱ = 1), the target of the last step."""
        t = torch.as_tensor(t, dtype=torch.long)
        ones = torch.ones_like(t, dtype=torch.float64)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], ones)


@dataclass(frozen=True)
class StepInfo:
    """One step of the grid: step k (K … 1), its position 0 … K−1, its timestep and ᾱ values.

    ``t_prev`` is the timestep the step lands on (−1 = clean data, ᾱ_prev = 1).
    """

    k: int
    index: int
    t: int
    alpha_bar: float
    alpha_bar_prev: float
    t_prev: int = -1


@dataclass(frozen=True)
class StepGrid:
    """The K sampling steps of a run, built once from a schedule and passed to every sampler."""

    steps: tuple[StepInfo, ...]

    @classmethod
    def build(cls, schedule: VPSchedule, num_steps: int) -> "StepGrid":
        """Evenly spaced steps of ``schedule`` (:meth:`VPSchedule.timesteps`)."""
        return cls.from_timesteps(schedule, schedule.timesteps(num_steps).tolist())

    @classmethod
    def from_timesteps(cls, schedule: VPSchedule, timesteps: list[int]) -> "StepGrid":
        """Steps at the given decreasing timesteps (e.g. those a diffusers scheduler chose)."""
        k_total = len(timesteps)
        landing = [int(t) for t in timesteps[1:]] + [-1]
        # one host read for the whole grid: ᾱ at every timestep and at the last landing point (−1: ᾱ = 1)
        alpha_bars = schedule.alpha_bar(torch.tensor([int(t) for t in timesteps] + [-1])).tolist()
        steps = [StepInfo(k=k_total - index, index=index, t=int(t), alpha_bar=alpha_bars[index],
                          alpha_bar_prev=alpha_bars[index + 1], t_prev=landing[index])
                 for index, t in enumerate(timesteps)]
        return cls(tuple(steps))

    @classmethod
    def from_landings(cls, schedule: VPSchedule, timesteps: list[int], landings: list[int]) -> "StepGrid":
        """Steps at ``timesteps`` where step i lands on ``landings[i]`` (−1 = clean data, ᾱ = 1), which need
        not be the next timestep.

        diffusers' ``DDIMScheduler`` lands on t − T // K whatever its ``timestep_spacing`` put next, and
        its last step on ``final_alpha_cumprod``: ᾱ_0 (landing 0) when ``set_alpha_to_one=False``, 1
        (landing −1) otherwise. A landing lies at or below its timestep (a step from t = 0 to ᾱ_0 leaves x
        where it is).
        """
        T = schedule.num_train_timesteps
        ts, lands = [int(t) for t in timesteps], [int(t) for t in landings]
        if not ts or len(ts) != len(lands):
            raise ValueError(f"StepGrid.from_landings: need as many landings as timesteps (at least one), "
                             f"got {len(ts)} timesteps and {len(lands)} landings")
        for t, land in zip(ts, lands):
            if not (0 <= t < T and -1 <= land <= t):
                raise ValueError(f"StepGrid.from_landings: step at t={t} landing on {land} is not a step towards "
                                 f"clean data of a {T}-step schedule (need 0 <= t < {T} and -1 <= landing <= t)")
        # one host read for the whole grid, as in from_timesteps
        alpha_bars = schedule.alpha_bar(torch.tensor(ts + lands)).tolist()
        k_total = len(ts)
        steps = [StepInfo(k=k_total - index, index=index, t=t, alpha_bar=alpha_bars[index],
                          alpha_bar_prev=alpha_bars[k_total + index], t_prev=lands[index])
                 for index, t in enumerate(ts)]
        return cls(tuple(steps))

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, index: int) -> StepInfo:
        return self.steps[index]


@dataclass(frozen=True)
class Prediction:
    """The denoiser output in both parametrisations."""

    x0: Tensor
    eps: Tensor


def _bcast(a: Tensor | float, like: Tensor) -> Tensor:
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


def to_x0_eps(model_output: Tensor, x_t: Tensor, alpha_bar_t: Tensor | float, prediction_type: str) -> Prediction:
    """Convert an eps, x0 or v prediction into (x̂0, ε̂) (Tweedie's estimate for eps models)."""
    a = _bcast(alpha_bar_t, x_t)
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "eps":
        eps = model_output
        x0 = (x_t - s1 * eps) / sa
    elif prediction_type == "x0":
        x0 = model_output
        eps = (x_t - sa * x0) / s1
    elif prediction_type == "v":
        # v = √ᾱ ε − √(1−ᾱ) x0
        x0 = sa * x_t - s1 * model_output
        eps = s1 * x_t + sa * model_output
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return Prediction(x0=x0, eps=eps)


def ddim_sigma(alpha_bar_t: Tensor | float, alpha_bar_prev: Tensor | float, eta: float) -> Tensor:
    """σ of the DDIM(η) step t -> prev; η = 1 gives the DDPM posterior standard deviation."""
    a_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    a_p = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    return eta * var.clamp(min=0).sqrt()


def ddim_step(
    x0: Tensor,
    eps: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float,
    noise: Tensor | None,
) -> Tensor:
    """x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ ξ.

    With η = 1 this is exactly the DDPM ancestral step (posterior q(x_prev | x_t, x̂0));
    ``noise`` may be None only when σ = 0.
    """
    if not isinstance(alpha_bar_t, Tensor) and not isinstance(alpha_bar_prev, Tensor):
        return _ddim_step_scalar(x0, eps, float(alpha_bar_t), float(alpha_bar_prev), eta, noise)
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    a_p = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    dir_coef = (1 - a_p - sigma**2).clamp(min=0).sqrt()
    out = _bcast(a_p.sqrt(), x0) * x0 + _bcast(dir_coef, eps) * eps
    if torch.any(sigma > 0):
        if noise is None:
            raise ValueError("ddim_step: noise is required when eta > 0")
        out = out + _bcast(sigma, noise) * noise
    return out


def _ddim_step_scalar(x0: Tensor, eps: Tensor, a_t: float, a_p: float, eta: float, noise: Tensor | None) -> Tensor:
    """:func:`ddim_step` for one step given as Python numbers: the coefficients are computed on the
    host in float64 (the same operations as :func:`ddim_sigma`) and enter the device kernels as
    scalars, so the step needs no host-to-device copy and no host read of a tensor."""
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    sigma = eta * math.sqrt(max(var, 0.0))
    dir_coef = math.sqrt(max(1 - a_p - sigma**2, 0.0))
    dtype = x0.dtype
    out = _as(math.sqrt(a_p), dtype) * x0 + _as(dir_coef, dtype) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step: noise is required when eta > 0")
        out = out + _as(sigma, dtype) * noise
    return out


def _as(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` first, as :func:`_bcast` does, so both step paths agree bit for bit."""
    if dtype == torch.float64:
        return value
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", value))[0]
    return torch.tensor(value, dtype=dtype).item()  # half precisions: a host tensor, no device involved


def q_sample(x0: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """Forward noising x_t = √ᾱ x0 + √(1−ᾱ) ε."""
    a = _bcast(alpha_bar_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps
