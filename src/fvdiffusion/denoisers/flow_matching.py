"""Flow-matching (rectified-flow) models as VP denoisers, so that every method runs on them unchanged.

A flow-matching model is trained on the linear interpolant x_t = (1 − t) x0 + t ε, t ∈ [0, 1],
and predicts the velocity v(x_t, t) = E[ε − x0 | x_t]. Dividing by c(t) = √((1 − t)² + t²)
turns that path into a variance-preserving one:

    x̃ = x_t / c(t) = √ᾱ x0 + √(1 − ᾱ) ε,   √ᾱ = (1 − t) / c(t),   √(1 − ᾱ) = t / c(t),

with ᾱ(t) = (1 − t)² / c(t)² decreasing from 1 (t = 0) to 0 (t = 1). So for the engine's VP
state x̃ at a table index we look up the flow time t, call the velocity model on x_t = c(t) x̃,
and read off x̂0 = x_t − t v and ε̂ = x_t + (1 − t) v. :class:`FlowMatchingDenoiser` returns
them as the VP v-prediction ((1 − 2t) x̃ + c(t) v, from which the engine recovers x̂0 and ε̂
with no division, so both ends of the path are exact).

In this view the engine's DDIM(η = 0) step from t to s is exactly the Euler step of the
flow ODE, x_s = x_t + (s − t) v (see :func:`euler_step`), and DDIM(η = 1) is the
marginal-preserving SDE (the DDPM posterior step of the VP process): the stochastic sampler
that selection and rebirth need. The last step lands on ᾱ = 1, where x0 = x̂0.

Timesteps stay integer indices into a :class:`~fvdiffusion.schedule.VPSchedule` table built
from a grid of flow times (:func:`vp_schedule_from_flow_times`); ᾱ(1) = 0 is clamped to
:data:`ALPHA_BAR_FLOOR`, small enough (√ᾱ = 2⁻²⁵) that the clamp is below float32 resolution.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fvdiffusion.schedule import StepGrid, VPSchedule

# ᾱ at t = 1 (zero terminal SNR) clamped to this, as diffusers clamps it for VP schedulers
# (they use 2⁻²⁴; here √ᾱ = 2⁻²⁵ is under float32's resolution, so the clamp changes no sample).
ALPHA_BAR_FLOOR = 2.0**-50

# v(x_t, t, cond) -> E[ε − x0 | x_t]: x_t [B, ...], t [B] float64 flow times in (0, 1] (on the CPU)
VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


def flow_scale(t: Tensor | float) -> Tensor:
    """c(t) = √((1 − t)² + t²) (float64): x_t = c(t) · x̃."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((1 - t) ** 2 + t**2).sqrt()


def flow_alpha_bar(t: Tensor | float) -> Tensor:
    """ᾱ(t) = (1 − t)² / ((1 − t)² + t²) (float64), clamped below at :data:`ALPHA_BAR_FLOOR`."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((1 - t) ** 2 / flow_scale(t) ** 2).clamp(min=ALPHA_BAR_FLOOR)


def flow_time_from_alpha_bar(alpha_bar: Tensor | float) -> Tensor:
    """The inverse of :func:`flow_alpha_bar`: t = 1 / (1 + √(ᾱ / (1 − ᾱ))) (float64; ᾱ = 1 gives t = 0)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if not bool(torch.all((a >= 0) & (a <= 1))):
        raise ValueError("alpha_bar must lie in [0, 1]")
    return (1 - a).sqrt() / ((1 - a).sqrt() + a.sqrt())


def check_flow_times(flow_times: Any) -> Tensor:
    """``flow_times`` as a float64 CPU tensor, checked: 1-D, non-empty, in (0, 1], strictly increasing."""
    if isinstance(flow_times, VPSchedule):
        raise TypeError("flow_times is a VPSchedule; pass it as schedule=... (or use flow_time_from_alpha_bar)")
    try:
        t = torch.as_tensor(flow_times, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"flow_times must be a 1-D sequence of numbers, got {type(flow_times).__name__}") from exc
    if t.ndim != 1 or t.numel() < 1:
        raise ValueError(f"flow_times must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not bool(torch.all(torch.isfinite(t) & (t > 0) & (t <= 1))):
        raise ValueError(f"flow_times must lie in (0, 1], got values in [{float(t.min())}, {float(t.max())}]")
    if not bool(torch.all(t[1:] > t[:-1])):
        raise ValueError("flow_times must be strictly increasing (index 0 = least noise, as in a VP table)")
    return t


def flow_time_table(flow_times: Any) -> Tensor:
    """The checked times as a table of at least 2 entries: a single time (one sampling step) is stored
    twice, since a VP table needs two; both indices then mean that time."""
    t = check_flow_times(flow_times)
    return t.repeat(2) if t.numel() == 1 else t


def vp_schedule_from_flow_times(flow_times: Any) -> VPSchedule:
    """The VP table of the flow times t_0 < … < t_{T−1}: ᾱ_i = ᾱ(t_i) (ᾱ(1) clamped, see module doc)."""
    return VPSchedule(flow_alpha_bar(flow_time_table(flow_times)))


def training_flow_times(num_train_timesteps: int = 1000) -> Tensor:
    """t_i = (i + 1) / T, i = 0 … T − 1: the training sigmas of diffusers' FlowMatchEulerDiscreteScheduler (shift 1)."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    return torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps


def shifted_flow_times(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The K sampling times (increasing) of FlowMatchEulerDiscreteScheduler(shift).set_timesteps(K), in float64.

    Evenly spaced from the largest to the smallest shifted training sigma, then shifted:
    t ↦ shift·t / (1 + (shift − 1)·t). (diffusers rounds them to float32; read a real scheduler
    with ``fvdiffusion.integrations.diffusers.flow_times_from_scheduler`` to match it bit for bit.)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")

    def shifted(s: Tensor) -> Tensor:
        return shift * s / (1 + (shift - 1) * s)

    train = shifted(training_flow_times(num_train_timesteps))
    # diffusers: linspace(σ_max, σ_min, K) over the *shifted* training sigmas, then shifted again
    times = torch.linspace(float(train[0]), float(train[-1]), num_steps, dtype=torch.float64) if num_steps > 1 \
        else train[-1:].clone()
    return shifted(times)


def euler_step(x_t: Tensor, v: Tensor, t: float, s: float) -> Tensor:
    """One Euler step of the flow ODE from time t to s: x_s = x_t + (s − t) v (what FlowMatchEuler does)."""
    return x_t + (s - t) * v


class FlowMatchingDenoiser:
    """The VP view of a velocity model: a Denoiser (``prediction_type = "v"``) every method runs on.

    ``velocity_fn(x_t, t, cond)`` gets flow states x_t [B, ...] (the dtype and device of the
    engine's population) and flow times t [B] (float64, CPU, in (0, 1]) and returns
    v = E[ε − x0 | x_t] of the shape of x_t. ``flow_times`` is the table of times the integer
    timesteps index (strictly increasing; default: the 1000 training times (i + 1) / 1000; a single
    time is stored twice, as a VP table needs two entries), or pass a ready VP ``schedule`` instead
    (its times are read back from ᾱ). Timestep −1 means clean data (t = 0): x̂0 = x̃ there, and the
    model is not called.

    Sampling: ``fv.sample(method, den, reward, num_steps=K, grid=den.step_grid(K))`` — the grid
    runs evenly over the table from its largest time down (``num_steps`` = the table's length
    walks every entry, which the engine's default grid also does then).
    """

    prediction_type = "v"

    def __init__(
        self,
        velocity_fn: VelocityFn,
        flow_times: Any = None,
        sample_shape: Sequence[int] = (),
        *,
        schedule: VPSchedule | None = None,
    ) -> None:
        if not callable(velocity_fn):
            raise TypeError(f"velocity_fn must be callable as velocity_fn(x_t, t, cond), got {type(velocity_fn).__name__}")
        if schedule is not None and flow_times is not None:
            raise ValueError("pass flow_times or schedule, not both")
        if schedule is not None:
            if not isinstance(schedule, VPSchedule):
                raise TypeError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
            times = flow_time_from_alpha_bar(schedule.alphas_cumprod)
            if not bool(torch.all(times[1:] > times[:-1])) or float(times[0]) <= 0:
                raise ValueError("schedule must have strictly decreasing alphas_cumprod below 1 to map to flow times")
            self.flow_times, self.schedule = times, schedule
        else:
            self.flow_times = flow_time_table(training_flow_times() if flow_times is None else flow_times)
            self.schedule = VPSchedule(flow_alpha_bar(self.flow_times))
        try:
            shape = tuple(int(s) for s in sample_shape)
        except TypeError as exc:
            raise TypeError(f"sample_shape must be a sequence of ints, got {sample_shape!r}") from exc
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"sample_shape must be a non-empty tuple of positive ints, got {sample_shape!r}")
        self.velocity_fn = velocity_fn
        self.sample_shape = shape
        self._times_ext = torch.cat([torch.zeros(1, dtype=torch.float64), self.flow_times])  # [0] = clean data

    # --------------------------------------------------------------- index <-> flow time

    @property
    def num_train_timesteps(self) -> int:
        return self.flow_times.numel()

    def flow_time(self, t: Tensor | int) -> Tensor:
        """Flow time of timestep index ``t`` (−1 = clean data, t = 0): float64, same shape."""
        idx = torch.as_tensor(t, dtype=torch.long).cpu()
        T = self.num_train_timesteps
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= T):
            raise ValueError(f"timestep indices must lie in [-1, {T - 1}], got values in [{int(idx.min())}, {int(idx.max())}]")
        return self._times_ext[idx + 1]

    def index_of(self, flow_time: Tensor | float | Sequence[float], tol: float = 1e-6) -> Tensor:
        """The table index of each flow time (long); a time further than ``tol`` from every entry is an error."""
        t = torch.as_tensor(flow_time, dtype=torch.float64).cpu()
        dist = (t.reshape(-1, 1) - self.flow_times.reshape(1, -1)).abs()
        best, idx = dist.min(dim=1)
        if best.numel() and float(best.max()) > tol:
            worst = float(t.reshape(-1)[int(best.argmax())])
            raise ValueError(f"flow time {worst!r} is not in this denoiser's table (nearest entry further than {tol:g})")
        return idx.reshape(t.shape)

    def step_grid(self, num_steps: int | None = None) -> StepGrid:
        """``num_steps`` steps evenly spaced over the table from its largest time down to its smallest
        (``None``: every entry), each landing on the next one and the last on clean data."""
        T = self.num_train_timesteps
        if num_steps is None:
            num_steps = T
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
        indices = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long().tolist() if num_steps > 1 \
            else [T - 1]
        return StepGrid.from_timesteps(self.schedule, indices)

    # --------------------------------------------------------------- the denoiser

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """VP v-prediction (1 − 2t) x̃ + c(t) v(c(t) x̃, t) for the VP states ``x_t`` at indices ``t``."""
        if tuple(x_t.shape[1:]) != self.sample_shape:
            raise ValueError(f"x_t must have shape [B, {', '.join(map(str, self.sample_shape))}], got {tuple(x_t.shape)}")
        idx = torch.as_tensor(t, dtype=torch.long).cpu()
        if idx.ndim == 0:
            idx = idx.expand(x_t.shape[0])
        if tuple(idx.shape) != (x_t.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [{x_t.shape[0]}], got {tuple(idx.shape)}")
        times = self.flow_time(idx)
        scale = flow_scale(times)
        bcast = (-1,) + (1,) * (x_t.ndim - 1)
        c = scale.to(x_t.device, x_t.dtype).reshape(bcast)
        x_flow = c * x_t
        noisy = idx >= 0
        v = torch.zeros_like(x_t)
        if bool(noisy.all()):
            v = self._velocity(x_flow, times, cond)
        elif bool(noisy.any()):
            rows = noisy.nonzero().flatten().to(x_t.device)
            v[rows] = self._velocity(x_flow[rows], times[noisy], cond)
        coef = (1 - 2 * times).to(x_t.device, x_t.dtype).reshape(bcast)
        return coef * x_t + c * v

    def _velocity(self, x_flow: Tensor, times: Tensor, cond: Any) -> Tensor:
        v = self.velocity_fn(x_flow, times, cond)
        if not isinstance(v, Tensor) or v.shape != x_flow.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"velocity_fn must return a tensor of shape {tuple(x_flow.shape)}, got {got}")
        return v.to(x_flow.device, x_flow.dtype)
