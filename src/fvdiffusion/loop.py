"""The engine's middle: one kernel contract, one driver, one path to a new population.

A particle method is a :class:`ParticleKernel`: after the denoiser call of every step its
``step`` may evaluate rewards, reweight, select and copy particles; the driver then takes the
DDIM(η) step for the whole population. Tree and candidate methods (svdd, dts) are a
:class:`Sampler` that runs its own search over the same context. :func:`run_kernel` owns
everything else — context, step grid, loop, final reward, final selection, result, cost and
the run's health — and :func:`select` is the only path from log-weights to a new population
(scheme, gather, lineage record).

Where things live: noise comes from one generator on the population's device, seeded by the
config; rewards, weights, selection and lineage stay on that device; nothing in the step loop
reads a device tensor on the host unless a progress bar or a callback asks for the step's
numbers (checks are deferred to the end of the run, see :mod:`fvdiffusion.checks`). Every
noise tensor is drawn for the whole population at once, so micro-batching the denoiser or the
reward cannot change a result. Seeded runs are reproducible on one device; a CUDA generator
draws a different stream than the CPU one, so the same seed gives different (equally valid)
samples on CPU and GPU.

In a process group (:mod:`fvdiffusion.distributed`) each rank holds a block of the slots: the
particle tensors x, x̂0, ε̂ have the block's rows, every per-particle scalar has all N (rewards
are all-gathered when evaluated), noise is keyed by slot chunks (:mod:`fvdiffusion.noise`), and
:func:`select` moves only the clones that cross ranks. The result is the same as one process
with the same ``noise_chunk``.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.profiler import record_function

from fvdiffusion import distributed, selection
from fvdiffusion.checks import HostChecks, eager_for
from fvdiffusion.config import CommonConfig
from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.errors import (
    AllParticlesDeadWarning, ConfigError, DenoiserError, NonFiniteDenoiserWarning, NonFiniteRewardWarning, RewardError,
    exception_line,
)
from fvdiffusion.noise import ChunkedNoise
from fvdiffusion.population import ParticleState, copy_into_dead, gather, initial_state
from fvdiffusion.result import Cost, Lineage, SampleResult, StepTrace
from fvdiffusion.rewards.base import Reward
from fvdiffusion.rewards.calling import as_reward_tensor, prompt_argument, reward_name
from fvdiffusion.schedule import Prediction, StepGrid, StepInfo, ddim_step, to_x0_eps

# Profiler ranges: one per engine step, and the model calls inside it (user code, not the engine's)
STEP_RANGE, DENOISER_RANGE, REWARD_RANGE = "fvdiffusion.step", "fvdiffusion.denoiser", "fvdiffusion.reward"

# Micro-batching when batch_size is None: rows per denoiser/reward call such that the
# activations (estimated as ACTIVATION_FACTOR x the input rows) fit the memory budget.
ACTIVATION_FACTOR = 256
CPU_MEMORY_BUDGET = 512 * 2**20      # bytes of activations per call on the CPU
ACCELERATOR_BUDGET_SHARE = 0.25      # of the device's free memory at the start of the run

__all__ = [
    "ParticleKernel", "Sampler", "FinalWeighting", "Finished", "RunContext", "RunHealth", "StepEvent",
    "StepInfo", "run_kernel", "select", "plain_trace", "auto_batch_rows", "DenoiserError", "RewardError",
    "NonFiniteRewardWarning", "AllParticlesDeadWarning", "NonFiniteDenoiserWarning",
]


# --- the contracts -------------------------------------------------------------------------

@dataclass(frozen=True)
class FinalWeighting:
    """What a kernel does with the final samples (their rewards already in ``state.reward``).

    ``state.log_weight`` holds the final importance weights. If ``log_w`` is given, the driver
    selects once more on it with ``scheme`` (and its ``scheme_options``, e.g. a Fleming–Viot
    parent rule and allocation) and makes
    the weights uniform; ``skip_if_uniform`` leaves uniform ``log_w`` alone (no copies for
    nothing); ``report_ess`` adds the ESS of ``log_w`` to the extras as ``final_ess``.
    """

    state: ParticleState
    log_w: Tensor | None = None
    scheme: str = "fleming_viot"
    scheme_options: dict[str, Any] = field(default_factory=dict)
    skip_if_uniform: bool = False
    report_ess: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    """A sampler's final population (x = samples, reward = their rewards, log_weight = weights)."""

    state: ParticleState
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ParticleKernel(Protocol):
    """A population method: one move per denoising step and a final weighting."""

    requires_final_reward: bool  # False: r(x0) only when a reward was given (base)

    def init(self, ctx: "RunContext", state: ParticleState) -> ParticleState:
        """The population before the first step (e.g. the run scalars a controller needs)."""

    def step(self, ctx: "RunContext", info: StepInfo, state: ParticleState) -> tuple[ParticleState, StepTrace]:
        """Act after the denoiser call of step ``info`` (x̂0, ε̂ are in the state)."""

    def finish(self, ctx: "RunContext", state: ParticleState) -> FinalWeighting:
        """The final weighting of the samples (state.x = x0, state.reward = r(x0))."""


@runtime_checkable
class Sampler(Protocol):
    """A tree or candidate method: runs its own search over the context's grid."""

    def run(self, ctx: "RunContext") -> Finished: ...


@dataclass(frozen=True)
class StepEvent:
    """What an observe-only callback sees after each step: the step, the population, its trace row.

    The tensors are the engine's own and may be overwritten in place later: clone what you keep.
    """

    info: StepInfo
    state: ParticleState
    trace: StepTrace


# --- the run's health ----------------------------------------------------------------------

@dataclass
class RunHealth:
    """What went wrong quietly during a run, summed so it can be reported once at the end.

    Counts may be device tensors until :meth:`settle` reads them after the loop.
    """

    reward_values: int = 0          # rewards evaluated (rows)
    nonfinite_rewards: Any = 0      # of those, NaN or ±inf
    all_dead_steps: set[int] = field(default_factory=set)  # steps k where every weight was −inf
    denoiser_values: int = 0        # denoiser outputs (rows)
    nonfinite_denoiser: int = 0     # of those, with a NaN or ±inf entry (killed under nonfinite_denoiser="kill")
    _dead_flags: list[tuple[int, Tensor]] = field(default_factory=list)

    def settle(self) -> None:
        """Read the deferred counters on the host (after the loop)."""
        if isinstance(self.nonfinite_rewards, Tensor):
            self.nonfinite_rewards = int(self.nonfinite_rewards)
        if self._dead_flags:
            flags = torch.stack([flag for _, flag in self._dead_flags]).cpu().tolist()
            self.all_dead_steps.update(k for (k, _), dead in zip(self._dead_flags, flags) if dead)
            self._dead_flags = []

    def as_dict(self) -> dict[str, Any]:
        self.settle()
        return {"reward_values": self.reward_values, "nonfinite_rewards": self.nonfinite_rewards,
                "all_dead_steps": sorted(self.all_dead_steps, reverse=True),
                "denoiser_values": self.denoiser_values, "nonfinite_denoiser": self.nonfinite_denoiser}

    def warn_once(self, method: str) -> None:
        """One summary warning per kind of fault for the whole run (never one per step)."""
        self.settle()
        if self.nonfinite_denoiser:
            warnings.warn(f"{method}: {self.nonfinite_denoiser} of {self.denoiser_values} denoiser outputs were "
                          f"non-finite (NaN/inf) and were dropped (nonfinite_denoiser='kill': those particles "
                          f"died and were reborn as copies of survivors)", NonFiniteDenoiserWarning, stacklevel=5)
        if not self.nonfinite_rewards and not self.all_dead_steps:
            return
        message = (f"{method}: {self.nonfinite_rewards} of {self.reward_values} reward values were "
                   f"non-finite (NaN/inf); those particles got zero weight")
        if self.all_dead_steps:
            steps = sorted(self.all_dead_steps, reverse=True)
            shown = ", ".join(str(k) for k in steps[:5]) + (", ..." if len(steps) > 5 else "")
            message += (f"; at {len(steps)} step(s) every particle had zero weight and the run "
                        f"continued with uniform weights (k = {shown}; k = 0 is the final selection)")
            warnings.warn(message, AllParticlesDeadWarning, stacklevel=5)
        else:
            warnings.warn(message, NonFiniteRewardWarning, stacklevel=5)


# --- the context ---------------------------------------------------------------------------

@dataclass
class RunContext:
    """Everything a kernel needs besides the population; owns randomness, calls and bookkeeping."""

    denoiser: Denoiser
    reward: Reward | None
    config: CommonConfig
    cond: Any = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cost: Cost = field(default_factory=Cost)
    lineage: Lineage | None = None
    trace: list[StepTrace] = field(default_factory=list)
    progress: Any = None  # a tqdm bar or None
    health: RunHealth = field(default_factory=RunHealth)
    checks: HostChecks = field(default_factory=lambda: HostChecks(eager=True))
    grid: StepGrid | None = None
    batch_rows: int | None = None   # micro-batch for model calls (config.batch_size, or from the memory budget)
    callback: Callable[[StepEvent], Any] | None = None
    x_init: Tensor | None = None    # the population at the first step, when the caller gives it
    shard: distributed.Shard | None = None  # this process's block of a population over a process group
    noise: ChunkedNoise | None = None       # keyed per slot chunk (config.noise_chunk), else one stream
    assembled: bool = False                 # after the loop: the whole population is on every rank
    step_alpha_bar: float = 1.0             # ᾱ of the step being taken

    def at_step(self, info: StepInfo) -> None:
        """The driver enters step ``info``; across processes, stop here if another rank failed."""
        self.step_alpha_bar = info.alpha_bar
        if self.shard is not None:
            self.shard.where = f"at step k={info.k} (t={info.t})"
            self.shard.poll()

    def assemble(self, state: ParticleState) -> ParticleState:
        """After the loop: the whole population on every rank (the samples all-gathered once).

        x̂0 and ε̂ are not gathered: the final weighting reads the samples and their rewards only.
        """
        if self.shard is None or self.assembled:
            return state
        self.shard.where = "on the final samples"
        x = self.shard.all_gather_rows(state.x, final=True)
        self.assembled = True
        if self.noise is not None:
            self.noise.lo, self.noise.hi = 0, self.config.n_particles
        return replace(state, x=x, x0_hat=x, eps_hat=x)

    def initial_x(self) -> Tensor:
        """x at the first step (this process's rows): the caller's ``x_init`` or fresh noise."""
        if self.x_init is None:
            return self.particle_noise(tuple(self.denoiser.sample_shape))
        return self.local(self.x_init).to(self.device, torch.float32).clone()

    @classmethod
    def create(cls, denoiser: Denoiser, reward: Reward | None, config: CommonConfig, cond: Any = None,
               progress: bool = False, desc: str = "", callback: Callable[[StepEvent], Any] | None = None,
               grid: StepGrid | None = None, x_init: Tensor | None = None, sharded: bool = True) -> "RunContext":
        _check_denoiser_contract(denoiser, grid)
        device = _device_of(denoiser)
        if sharded and distributed.process_group() is not None and config.noise_chunk is None:
            config = replace(config, noise_chunk=distributed.default_chunk(config.n_particles))
        shard = distributed.shard_for(config.n_particles, config.noise_chunk, device) if sharded else None
        generator = torch.Generator(device=device).manual_seed(config.seed)
        ctx = cls(denoiser=denoiser, reward=reward, config=config, cond=cond, generator=generator, device=device,
                  checks=HostChecks(eager=eager_for(device)), callback=callback,
                  grid=grid if grid is not None else StepGrid.build(denoiser.schedule, config.num_steps),
                  x_init=_checked_x_init(x_init, config, denoiser), shard=shard)
        if len(ctx.grid) != config.num_steps:
            raise ConfigError(f"invalid grid: it has {len(ctx.grid)} steps, expected num_steps={config.num_steps}")
        lo, hi = (shard.lo, shard.hi) if shard is not None else (0, config.n_particles)
        if config.noise_chunk is not None:
            ctx.noise = ChunkedNoise(seed=config.seed, chunk=config.noise_chunk, n=config.n_particles, lo=lo, hi=hi,
                                     device=device)
        ctx.batch_rows = config.batch_size if config.batch_size is not None else auto_batch_rows(
            hi - lo, tuple(denoiser.sample_shape), device)
        ctx.lineage = Lineage(n_particles=config.n_particles, num_steps=config.num_steps)
        if progress:
            from tqdm.auto import tqdm

            ctx.progress = tqdm(total=config.num_steps, desc=desc or "denoising", leave=False)
        return ctx

    # --- randomness -------------------------------------------------------------------
    def particle_noise(self, tail: tuple[int, ...]) -> Tensor:
        """Gaussian noise [rows, *tail] for this process's particles (all N in one process)."""
        if self.noise is not None:
            return self.noise.particles(tuple(tail))
        return self.randn((self.config.n_particles, *tail))

    def decision_generator(self) -> torch.Generator:
        """The generator of a population-wide decision (a selection): the same on every rank."""
        return self.noise.decisions() if self.noise is not None else self.generator

    def local(self, values: Tensor) -> Tensor:
        """This process's rows of a population-wide [N, ...] tensor (all of them in one process)."""
        if self.shard is None or self.assembled:
            return values
        return self.shard.local(values)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Gaussian noise for a whole population, drawn on the population's device."""
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.device)

    def rand(self, n: int) -> Tensor:
        """n uniforms in [0, 1) as float64 on the population's device."""
        return torch.rand(n, generator=self.generator, dtype=torch.float64, device=self.device)

    # --- model calls -------------------------------------------------------------------
    def batches(self, x: Tensor):
        """The micro-batches of a model call. With slot-keyed noise, a batch never crosses a noise
        chunk, so every chunk meets the networks in the same batches on any number of processes."""
        noise = self.noise
        if noise is None or x.shape[0] != noise.hi - noise.lo or noise.lo % noise.chunk:
            yield from _chunks(x, self.batch_rows)
            return
        for start in range(0, x.shape[0], noise.chunk):
            yield from _chunks(x[start : start + noise.chunk], self.batch_rows)

    def denoise(self, x: Tensor, t: int, alpha_bar: float, k: int | None = None,
                what: str = "particles") -> tuple[Prediction, Tensor | None]:
        """One denoiser evaluation per row of x, micro-batched: (x̂0, ε̂) and the rows to kill.

        Every sampler calls the denoiser here, so faults are caught at their source: an
        exception or a wrong shape raises :class:`DenoiserError` naming the step at once; a
        NaN/±inf output does too under ``nonfinite_denoiser="raise"`` (after the loop when checks
        are deferred). Under ``"kill"`` the rows whose output is not finite are returned (None
        when all are finite) and counted in the run's health; the caller kills them, and raises
        :meth:`all_killed` if no particle is left. "kill" reads the outputs on the host.
        """
        where = f"at step k={k} (t={t})" if k is not None else f"at t={t}"
        outputs = []
        for chunk in self.batches(x):
            t_batch = torch.full((chunk.shape[0],), t, dtype=torch.long, device=chunk.device)
            try:
                with record_function(DENOISER_RANGE):
                    out = self.denoiser(chunk.clone(), t_batch, self.cond)  # a copy: x is read again below
            except Exception as exc:  # keep the original as __cause__, add where it happened
                self.checks.resolve()  # an earlier deferred failure explains more than this one
                raise DenoiserError(f"denoiser raised {where}: {exception_line(exc)}") from exc
            if not isinstance(out, Tensor):
                raise DenoiserError(f"denoiser must return a torch.Tensor, got {type(out).__name__} {where}")
            if out.shape != chunk.shape:
                raise DenoiserError(f"denoiser returned shape {tuple(out.shape)}, expected {tuple(chunk.shape)} "
                                    f"{where}")
            if not out.is_floating_point():  # int, bool or complex outputs would flow into the samples
                raise DenoiserError(f"denoiser returned dtype {out.dtype} {where}: expected a real floating dtype")
            if out.device != chunk.device:
                raise DenoiserError(f"denoiser returned a tensor on {out.device} {where}: expected the population's "
                                    f"device, {chunk.device}")
            # the population's dtype (a float16 output would break index writes downstream); never a graph
            outputs.append(out.detach().to(chunk.dtype))
            self.cost.denoiser_calls += chunk.shape[0]
        model_output = torch.cat(outputs)  # always a fresh tensor: the engine owns (and may overwrite) it
        self.health.denoiser_values += model_output.shape[0]
        dead = None
        if self.config.nonfinite_denoiser == "raise":
            self._require_finite(model_output, where, what)
        elif not bool(torch.isfinite(model_output).all()):
            dead = ~torch.isfinite(model_output.reshape(model_output.shape[0], -1)).all(dim=1)
            self.health.nonfinite_denoiser += int(dead.sum())
        return to_x0_eps(model_output, x, alpha_bar, self.denoiser.prediction_type), dead

    def _require_finite(self, model_output: Tensor, where: str, what: str) -> None:
        rows = model_output.shape[0]

        def error(count: int) -> DenoiserError:
            return DenoiserError(f"denoiser returned NaN/inf {where} for {count} of {rows} {what}; "
                                 f"set nonfinite_denoiser='kill' to drop those particles instead")

        finite = torch.isfinite(model_output)
        if self.checks.eager:
            if not bool(finite.all()):
                raise error(int((~finite.reshape(rows, -1).all(dim=1)).sum()))
            return
        bad_rows = (~finite.reshape(rows, -1).all(dim=1)).sum()
        self.checks.require(bad_rows > 0, lambda: error(int(bad_rows)))

    def all_killed(self, k: int, t: int, total: int, what: str = "particles") -> DenoiserError:
        """The error for a step where killing the non-finite outputs left no particle alive."""
        return DenoiserError(f"denoiser returned NaN/inf at step k={k} (t={t}) for all {total} {what}: "
                             f"nonfinite_denoiser='kill' left none alive")

    def rewards_where_alive(self, x0: Tensor, k: int | None, dead: Tensor | None) -> Tensor:
        """r(x0) for the rows the denoiser got right; NaN for killed rows (counted as denoiser, not reward, faults)."""
        if dead is None:
            return self.evaluate_reward(x0, k)
        rewards = torch.full((x0.shape[0],), float("nan"), dtype=torch.float64, device=self.device)
        alive = ~dead
        if bool(alive.any()):
            rewards[alive] = self.evaluate_reward(x0[alive.to(x0.device)], k)
        return rewards

    def evaluate_reward(self, x0: Tensor, k: int | None) -> Tensor:
        """r(x0) for every row, micro-batched, as float64 [N] on the population's device; validated at every call."""
        if self.reward is None:
            raise RewardError("this method needs a reward, but reward=None was given")
        where = f"at step k={k}" if k is not None else "on the final samples"
        values = []
        for chunk in self.batches(x0):
            try:
                with record_function(REWARD_RANGE):
                    # a copy: x̂0 is read again (rebirth copies it), and a reward may write into its input
                    r = self.reward(chunk.clone(), prompt_argument(self.reward, self.cond, chunk.shape[0]))
            except Exception as exc:  # keep the original as __cause__, add where it happened
                self.checks.resolve()  # e.g. a NaN denoiser output fed to the reward: report that first
                raise RewardError(f"reward raised {where}: {exception_line(exc)}") from exc
            r = as_reward_tensor(r, chunk.shape[0], reward_name(self.reward), where)
            if r.is_meta:
                raise RewardError(f"reward {reward_name(self.reward)!r} returned a tensor on the meta device (no "
                                  f"values) {where}")
            values.append(r.detach().to(self.device, torch.float64))
            self.cost.reward_calls += chunk.shape[0]
        rewards = torch.cat(values)
        if self.shard is not None and not self.assembled:
            rewards = self.shard.all_gather_rows(rewards)  # every rank keeps all N rewards
        self.health.reward_values += rewards.numel()
        self.health.nonfinite_rewards = self.health.nonfinite_rewards + (~torch.isfinite(rewards)).sum()
        return rewards

    def guard_all_dead(self, log_w: Tensor, k: int | None) -> Tensor:
        """If every weight is −inf, continue with uniform weights; counted for the run's one warning."""
        all_dead = torch.isneginf(log_w).all()
        step = 0 if k is None else k
        if self.checks.eager:
            if bool(all_dead):
                self.health.all_dead_steps.add(step)
                return torch.zeros_like(log_w)
            return log_w
        self.health._dead_flags.append((step, all_dead))
        return torch.where(all_dead, torch.zeros_like(log_w), log_w)

    # --- bookkeeping -------------------------------------------------------------------
    def record(self, trace: StepTrace, info: StepInfo | None = None, state: ParticleState | None = None) -> None:
        """Append a trace row; read it on the host only if a progress bar or a callback wants it now."""
        if self.progress is not None or self.callback is not None:
            trace = settle_trace([trace])[0]
        self.trace.append(trace)
        if self.progress is not None:
            self.progress.update(1)
            post = {"ess": f"{trace.ess:.2f}", "dead": f"{trace.dead_fraction:.2f}"}
            if trace.reward_mean == trace.reward_mean:
                post["r"] = f"{trace.reward_mean:.3g}"
            self.progress.set_postfix(post, refresh=False)
        if self.callback is not None and info is not None and state is not None:
            self.callback(StepEvent(info=info, state=state, trace=trace))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _checked_x_init(x_init: Any, config: CommonConfig, denoiser: Denoiser) -> Tensor | None:
    if x_init is None:
        return None
    shape = (config.n_particles, *denoiser.sample_shape)
    if not isinstance(x_init, Tensor) or tuple(x_init.shape) != shape:
        got = tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__
        raise ConfigError(f"invalid x_init: expected a tensor of shape {shape} (n_particles, *sample_shape), got {got}")
    if not bool(torch.isfinite(x_init).all()):
        raise ConfigError("invalid x_init: it contains NaN or inf")
    return x_init


def auto_batch_rows(n_particles: int, sample_shape: tuple[int, ...], device: torch.device) -> int:
    """Rows per model call when batch_size is None: as many as fit the activation budget.

    A whole population in one call is fastest only while it fits the caches and memory; at
    N = 1024 MNIST particles one call cost 1.7x the time and 2.4x the memory of 256-row calls.
    The budget is CPU_MEMORY_BUDGET on the CPU and a share of the free memory on CUDA;
    activations are estimated as ACTIVATION_FACTOR float32 copies of a row.
    """
    row_bytes = max(1, math.prod(sample_shape)) * 4 * ACTIVATION_FACTOR
    budget = CPU_MEMORY_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * ACCELERATOR_BUDGET_SHARE)
    return max(1, min(n_particles, budget // row_bytes))


def _device_of(denoiser: Denoiser) -> torch.device:
    dev = getattr(denoiser, "device", None)
    if dev is not None:
        return torch.device(dev)
    module = getattr(denoiser, "module", None)
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _chunks(x: Tensor, batch_size: int | None):
    if batch_size is None or batch_size >= x.shape[0]:
        yield x
        return
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


# --- trace rows ----------------------------------------------------------------------------

def reward_stats(reward: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of the finite rewards as 0-dim tensors (NaN when none is finite)."""
    finite = torch.isfinite(reward)
    mean = torch.where(finite, reward, torch.zeros_like(reward)).sum() / finite.sum()
    best = torch.where(finite, reward, torch.full_like(reward, -math.inf)).amax()
    return mean, torch.where(finite.any(), best, torch.full_like(best, math.nan))


def _check_denoiser_contract(denoiser: Any, grid: Any) -> None:
    """The three attributes the engine reads off a denoiser, checked before anything runs, so a
    missing schedule or a wrong prediction type is one line naming it, not an internal error."""
    from fvdiffusion.schedule import VPSchedule

    name = type(denoiser).__name__
    if not callable(denoiser):
        raise TypeError(f"denoiser: {name} is not callable as denoiser(x_t, t, cond)")
    if grid is None and not isinstance(getattr(denoiser, "schedule", None), VPSchedule):
        raise TypeError(f"denoiser.schedule: expected a VPSchedule, got {type(getattr(denoiser, 'schedule', None)).__name__}"
                        f" on {name}")
    if getattr(denoiser, "prediction_type", None) not in ("eps", "x0", "v"):
        raise ValueError(f"denoiser.prediction_type: expected 'eps', 'x0' or 'v', got "
                         f"{getattr(denoiser, 'prediction_type', None)!r} on {name}")
    shape = getattr(denoiser, "sample_shape", None)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"denoiser.sample_shape: expected a tuple of positive ints, got {shape!r} on {name}")


def distinct_count(index: Tensor) -> Tensor:
    """How many distinct values a long tensor of indices in [0, N) holds (0-dim, no sort)."""
    seen = torch.zeros(index.numel(), dtype=torch.bool, device=index.device)
    return seen.index_fill_(0, index, True).sum()


def plain_trace(info: StepInfo, state: ParticleState, lam: float, **overrides: Any) -> StepTrace:
    """A trace row with the population statistics filled in; callers override what they changed.

    Values may be 0-dim device tensors; :func:`settle_trace` turns them into numbers.
    """
    mean, best = reward_stats(state.reward)
    values = dict(
        step=info.k, t=info.t, selected=False, ess=1.0, dead_fraction=0.0, lam=lam, kappa=1.0,
        distinct_roots=distinct_count(state.root), reward_mean=mean, reward_max=best, nonfinite_rewards=0,
    )
    values.update(overrides)
    return StepTrace(**values)


_INT_FIELDS = {"step", "t", "distinct_roots", "nonfinite_rewards"}


def settle_trace(rows: list[StepTrace]) -> list[StepTrace]:
    """The rows with every tensor value read on the host in one transfer (ints stay ints)."""
    slots = [(i, f.name) for i, row in enumerate(rows) for f in fields(row) if isinstance(getattr(row, f.name), Tensor)]
    if not slots:
        return rows
    tensors = [getattr(rows[i], name).detach().reshape(()) for i, name in slots]
    by_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(position)
    values: list[float] = [0.0] * len(tensors)
    for positions in by_device.values():  # one transfer per device
        read = torch.stack([tensors[p].to(torch.float64) for p in positions]).cpu().tolist()
        for p, value in zip(positions, read):
            values[p] = value
    settled = [dict() for _ in rows]
    for (i, name), value in zip(slots, values):
        settled[i][name] = int(value) if name in _INT_FIELDS else (bool(value) if name == "selected" else value)
    return [replace(row, **changes) if changes else row for row, changes in zip(rows, settled)]


# --- the one path from log-weights to a new population ---------------------------------------

def select(ctx: RunContext, state: ParticleState, log_w: Tensor, scheme: str, k: int,
           **scheme_options: Any) -> tuple[ParticleState, selection.Selection]:
    """Select on ``log_w`` with ``scheme`` (registry lookup; ``scheme_options`` such as a
    Fleming–Viot ``parent_rule`` and ``allocation`` are passed on), copy particles, record the lineage.

    ``log_w`` must be finite or −inf with at least one finite entry (the potentials module and
    :meth:`RunContext.guard_all_dead` make it so). On the CPU only the reborn slots are written;
    on an accelerator the gather is one out-of-place copy (finding the reborn slots would read
    the device on the host).
    """
    scheme_fn = selection.get_scheme(scheme)
    checked = False  # potentials are cleaned upstream; validating would read the device
    generator = ctx.decision_generator()
    outcome = scheme_fn(log_w, generator, checked=checked, **scheme_options)
    state = _copy_selected(ctx, state, outcome.ancestors, outcome.reborn)
    ctx.lineage.record(k, outcome.ancestors)
    return state, outcome


def _copy_selected(ctx: RunContext, state: ParticleState, ancestors: Tensor, reborn: Tensor) -> ParticleState:
    if ctx.shard is not None and not ctx.assembled:
        return ctx.shard.select_particles(state, ancestors, ctx.step_alpha_bar)
    if ctx.checks.eager:
        return copy_into_dead(state, ancestors, reborn)
    return gather(state, ancestors)


def rebirth_killed(ctx: RunContext, state: ParticleState, dead: Tensor, k: int) -> ParticleState:
    """Replace every killed particle by a copy of a survivor drawn ∝ its weight (recorded in the lineage).

    The copy gets the survivors' mean weight, so the weighted population still estimates what
    the survivors estimate. It is an exact copy (no rebirth noise): a fault path, not a move.
    """
    dead = dead.to(state.log_weight.device)
    alive = ~dead
    log_w = state.log_weight[alive]
    if bool(torch.isneginf(log_w).all()):
        log_w = torch.zeros_like(log_w)
    parents_alive = torch.multinomial(torch.softmax(log_w, dim=0), int(dead.sum()), replacement=True,
                                      generator=ctx.decision_generator())
    ancestors = torch.arange(state.n, device=dead.device)
    ancestors[dead] = torch.nonzero(alive).flatten()[parents_alive]
    mean_log_w = torch.logsumexp(log_w, dim=0) - math.log(log_w.numel())
    state = _copy_selected(ctx, state, ancestors, dead)
    state = replace(state, log_weight=torch.where(dead, mean_log_w, state.log_weight))
    ctx.lineage.record(k, ancestors)
    return state


def equalise_final(ctx: RunContext, state: ParticleState, weighting: FinalWeighting) -> tuple[ParticleState, dict]:
    """The final selection a kernel asked for; returns the population with uniform weights and extras."""
    extras = dict(weighting.extras)
    log_w = ctx.guard_all_dead(weighting.log_w, 0)
    if weighting.report_ess:
        extras["final_ess"] = selection.ess(log_w)
    finite = log_w[torch.isfinite(log_w)]
    if weighting.skip_if_uniform and finite.numel() == log_w.numel() and float(finite.max() - finite.min()) <= 1e-12:
        dead = 0.0
    else:
        state, outcome = select(ctx, state, log_w, weighting.scheme, 0, **weighting.scheme_options)
        dead = float(outcome.reborn.double().mean())
    extras["final_dead_fraction"] = dead
    return replace(state, log_weight=torch.zeros_like(state.log_weight)), extras


# --- the one driver --------------------------------------------------------------------------

def particle_loop(ctx: RunContext, kernel: ParticleKernel) -> ParticleState:
    """Denoise N particles from pure noise to t = 0, letting ``kernel.step`` act after each denoiser call."""
    sample_shape = tuple(ctx.denoiser.sample_shape)
    state = kernel.init(ctx, initial_state(ctx.initial_x(), n=ctx.config.n_particles))
    for info in ctx.grid:
        ctx.at_step(info)
        with record_function(STEP_RANGE):
            pred, dead = ctx.denoise(state.x, info.t, info.alpha_bar, info.k)
            state = replace(state, x0_hat=pred.x0, eps_hat=pred.eps)
            if dead is not None:
                if bool(dead.all()):
                    raise ctx.all_killed(info.k, info.t, state.n)
                state = rebirth_killed(ctx, state, dead, info.k)
            state, trace = kernel.step(ctx, info, state)
            noise = ctx.particle_noise(sample_shape) if ctx.config.eta > 0 else None
            x_prev = ddim_step(state.x0_hat, state.eps_hat, info.alpha_bar, info.alpha_bar_prev, ctx.config.eta,
                               noise)
            state = replace(state, x=x_prev)
        ctx.record(trace, info, state)
    return state


def run_kernel(method: str, kernel: ParticleKernel | Sampler, denoiser: Denoiser, reward: Reward | None,
               config: CommonConfig, cond: Any = None, progress: bool = False,
               callback: Callable[[StepEvent], Any] | None = None, grid: StepGrid | None = None,
               x_init: Tensor | None = None, sharded: bool | None = None) -> SampleResult:
    """Run one method end to end: context, loop (or search), final reward and selection, result, cost.

    ``grid``: the steps to take (default: ``StepGrid.build(denoiser.schedule, num_steps)``);
    ``x_init``: the population at the first step, [N, *sample_shape] (default: fresh noise);
    ``sharded``: None spreads the population over the initialised process group when there is
    one; False keeps it in this process whatever the group.
    """
    if isinstance(kernel, Sampler) and config.noise_chunk is not None:
        raise ConfigError(f"invalid noise_chunk={config.noise_chunk} for method {method!r}: slot-keyed noise "
                          f"applies to the population methods only")
    if sharded is not False and distributed.process_group() is not None:
        _check_shardable(method, kernel, config, sharded)
    ctx = RunContext.create(denoiser, reward, config, cond, progress, desc=method, callback=callback, grid=grid,
                            x_init=x_init, sharded=sharded is not False)
    if ctx.shard is not None:  # every rank raises the same line itself: nothing to publish
        try:
            ctx.shard.agree(call_fingerprint(method, ctx, kernel))
        except BaseException:
            ctx.close()
            raise
    try:  # gradient-free: no autograd graph is kept across steps, whatever the models return
        with torch.no_grad(), Timer(ctx.cost, ctx.device):
            if isinstance(kernel, Sampler):
                finished = kernel.run(ctx)
            else:
                finished = _finish_particles(ctx, kernel, particle_loop(ctx, kernel))
            ctx.checks.resolve()
            result = make_result(ctx, method, finished.state, finished.extras)
    except BaseException as exc:
        if ctx.shard is not None and isinstance(exc, Exception):
            raise ctx.shard.fail(exc) from exc
        raise
    finally:
        ctx.close()
    result.extras.setdefault("health", ctx.health.as_dict())
    ctx.health.warn_once(method)
    return result


def call_fingerprint(method: str, ctx: RunContext, kernel: ParticleKernel | Sampler) -> dict[str, Any]:
    """What every rank of a sharded run must agree on, by name: the method, each config field
    (N, K, seed, lam, ...), the condition (prompt), the initial population, the grid and the
    classes of the models (their weights are not compared)."""
    fields: dict[str, Any] = {"method": method}
    fields.update(ctx.config.as_dict())
    fields.update({"cond (the prompt or condition)": ctx.cond, "x_init": ctx.x_init,
                   "timesteps": [(s.t, s.t_prev) for s in ctx.grid],
                   "denoiser class": type(ctx.denoiser).__name__, "reward class": type(ctx.reward).__name__})
    return fields


def _check_shardable(method: str, kernel: ParticleKernel | Sampler, config: CommonConfig,
                     sharded: bool | None) -> None:
    """What cannot run across processes is refused before any model call, in one line."""
    hint = "pass sharded=False to run a whole population in each process"
    if isinstance(kernel, Sampler):
        raise ConfigError(f"method {method!r} cannot spread one population over processes (its search is "
                          f"driven from one process); {hint}")
    if config.nonfinite_denoiser == "kill":
        raise ConfigError("invalid nonfinite_denoiser='kill' across processes (a kill is a data-dependent, "
                          "host-driven rebirth); use 'raise', or " + hint)
    if getattr(config, "rebirth", None) == "langevin":
        raise ConfigError("invalid rebirth='langevin' across processes (each clone's Langevin moves need its "
                          "parent's x_t on the clone's rank); use rebirth='renoise', or " + hint)


def _finish_particles(ctx: RunContext, kernel: ParticleKernel, state: ParticleState) -> Finished:
    if ctx.reward is not None or kernel.requires_final_reward:
        if ctx.shard is not None:
            ctx.shard.where = "on the final samples"
        state = replace(state, x0_hat=state.x, reward=ctx.evaluate_reward(state.x, None))
    state = ctx.assemble(state)
    weighting = kernel.finish(ctx, state)
    if weighting.log_w is None:
        return Finished(weighting.state, dict(weighting.extras))
    state, extras = equalise_final(ctx, weighting.state, weighting)
    return Finished(state, extras)


def make_result(ctx: RunContext, method: str, state: ParticleState, extras: dict[str, Any] | None = None
                ) -> SampleResult:
    """The public result: samples on the population's device, rewards/weights/lineage on the CPU."""
    log_weights = state.log_weight.detach().cpu()
    finite = torch.isfinite(log_weights)
    if finite.any():
        log_weights = log_weights - torch.logsumexp(log_weights[finite], dim=0)
    else:
        log_weights = torch.full_like(log_weights, -math.log(log_weights.numel()))
    ctx.lineage.settle()
    if ctx.shard is not None:
        extras = {**(extras or {}), "distributed": _whole_run_costs(ctx)}
    return SampleResult(
        samples=state.x,
        rewards=state.reward.detach().cpu(),
        log_weights=log_weights,
        lineage=ctx.lineage,
        trace=settle_trace(ctx.trace),
        cost=ctx.cost,
        config={"method": method, **ctx.config.as_dict()},
        extras=extras or {},
    )


def _whole_run_costs(ctx: RunContext) -> dict[str, Any]:
    """Sum the counts every rank made for its own block; returns what the communication cost."""
    shard = ctx.shard
    stats = shard.stats
    totals = shard.sum_ints([ctx.cost.denoiser_calls, ctx.cost.reward_calls, ctx.health.denoiser_values,
                             stats.particle_rows_sent, stats.particle_bytes_sent, stats.scalar_bytes_sent,
                             stats.final_bytes_sent])
    ctx.cost.denoiser_calls, ctx.cost.reward_calls, ctx.health.denoiser_values = totals[:3]
    return {"world_size": shard.world, "rank": shard.rank, "blocks": list(shard.starts),
            "noise_chunk": ctx.config.noise_chunk, "selections": stats.selections,
            "particle_rows_moved": totals[3], "particle_bytes_moved": totals[4], "scalar_bytes_gathered": totals[5],
            "samples_bytes_gathered": totals[6]}


class Timer:
    """Wall time and peak memory of a run, written into the cost at the end."""

    def __init__(self, cost: Cost, device: torch.device) -> None:
        self.cost, self.device = cost, device

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.cost.wall_seconds += time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            # process-wide peak resident set size (Linux reports KiB)
            self.cost.peak_memory_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
