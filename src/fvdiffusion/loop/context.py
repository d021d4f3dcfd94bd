"""The run context: randomness, the model calls (micro-batched, validated) and bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from fvdiffusion import distributed
from fvdiffusion.checks import HostChecks, eager_for
from fvdiffusion.config import CommonConfig
from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.errors import ConfigError, DenoiserError, RewardError, exception_line
from fvdiffusion.loop.health import RunHealth, StepEvent, settle_trace
from fvdiffusion.noise import ChunkedNoise
from fvdiffusion.population import ParticleState
from fvdiffusion.result import Cost, Lineage, StepTrace
from fvdiffusion.rewards.base import Reward
from fvdiffusion.rewards.calling import as_reward_tensor, prompt_argument, reward_name
from fvdiffusion.schedule import Prediction, StepGrid, StepInfo, to_x0_eps
from fvdiffusion.transitions import Transition, make_transition

STEP_RANGE, DENOISER_RANGE, REWARD_RANGE = "fvdiffusion.step", "fvdiffusion.denoiser", "fvdiffusion.reward"

# Micro-batching when batch_size is None: rows per denoiser/reward call such that the
# activations (estimated as ACTIVATION_FACTOR x the input rows) fit the memory budget.
ACTIVATION_FACTOR = 256
CPU_MEMORY_BUDGET = 512 * 2**20      # bytes of activations per call on the CPU
ACCELERATOR_BUDGET_SHARE = 0.25      # of the device's free memory at the start of the run



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
    transition: Transition | None = None    # how particles move between grid points (from the config)

    def at_step(self, info: StepInfo) -> None:
        """The driver enters step ``info``; across processes, stop here if another rank failed."""
        self.step_alpha_bar = info.alpha_bar
        if self.shard is not None:
            self.shard.where = f"at step k={info.k} (t={info.t})"
            self.shard.poll()

    def assemble(self, state: ParticleState) -> ParticleState:
        """After the loop: the whole population on every rank (the samples all-gathered once).

        x̂0, ε̂ and the transition's history are not gathered: the final weighting reads the samples and
        their rewards only.
        """
        if self.shard is None or self.assembled:
            return state
        self.shard.where = "on the final samples"
        x = self.shard.all_gather_rows(state.x, final=True)
        self.assembled = True
        if self.noise is not None:
            self.noise.lo, self.noise.hi = 0, self.config.n_particles
        return replace(state, x=x, x0_hat=x, eps_hat=x, history={})  # no step follows: the solver memory is done

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
        ctx.transition = make_transition(config, ctx.grid)
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
