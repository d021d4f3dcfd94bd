"""The one driver: the step loop, the one path from log-weights to a new population, the result."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from fvdiffusion import distributed, selection
from fvdiffusion.config import CommonConfig
from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.errors import ConfigError
from fvdiffusion.loop.context import STEP_RANGE, RunContext
from fvdiffusion.loop.contracts import FinalWeighting, Finished, ParticleKernel, Sampler, StepResult
from fvdiffusion.loop.health import StepEvent, settle_trace
from fvdiffusion.population import ParticleState, gather, initial_state
from fvdiffusion.result import Cost, SampleResult
from fvdiffusion.rewards.base import Reward
from fvdiffusion.schedule import Prediction, StepGrid


def select(ctx: RunContext, state: ParticleState, log_w: Tensor, scheme: str, k: int,
           **scheme_options: Any) -> tuple[ParticleState, selection.Selection]:
    """Select on ``log_w`` with ``scheme`` (registry lookup; ``scheme_options`` such as a
    Fleming–Viot ``parent_rule`` and ``allocation`` are passed on) and copy particles. The kernel
    returns the selection in its :class:`StepResult`; the driver records it in the lineage.

    ``log_w`` must be finite or −inf with at least one finite entry (the potentials module and
    :meth:`RunContext.guard_all_dead` make it so). The new population is one out-of-place gather
    on every device (the state is frozen and never written in place).
    """
    scheme_fn = selection.get_scheme(scheme)
    checked = False  # potentials are cleaned upstream; validating would read the device
    generator = ctx.decision_generator()
    outcome = scheme_fn(log_w, generator, checked=checked, **scheme_options)
    state = _copy_selected(ctx, state, outcome.ancestors, outcome.reborn)
    return state, outcome


def _copy_selected(ctx: RunContext, state: ParticleState, ancestors: Tensor, reborn: Tensor) -> ParticleState:
    if ctx.shard is not None and not ctx.assembled:
        return ctx.shard.select_particles(state, ancestors, ctx.step_alpha_bar)
    return gather(state, ancestors)


def rebirth_killed(ctx: RunContext, state: ParticleState, dead: Tensor) -> tuple[ParticleState, selection.Selection]:
    """Replace every killed particle by a copy of a survivor drawn ∝ its weight (``selection.REBIRTH_RULES``).

    The copy gets the survivors' mean weight, so the weighted population still estimates what
    the survivors estimate. It is an exact copy (no rebirth noise): a fault path, not a move.
    Returns the population and the selection, which the driver records in the lineage.
    """
    dead = dead.to(state.log_weight.device)
    outcome = selection.REBIRTH_RULES["weighted"](state.log_weight, dead, ctx.decision_generator())
    log_w = state.log_weight[~dead]
    if bool(torch.isneginf(log_w).all()):
        log_w = torch.zeros_like(log_w)
    mean_log_w = torch.logsumexp(log_w, dim=0) - math.log(log_w.numel())
    state = _copy_selected(ctx, state, outcome.ancestors, dead)
    return replace(state, log_weight=torch.where(dead, mean_log_w, state.log_weight)), outcome


def _record(ctx: RunContext, k: int, *selections: selection.Selection | None) -> None:
    """One lineage record for step k: the selections made there, composed in the order they happened."""
    ancestors = None
    for outcome in selections:
        if outcome is None:
            continue
        # after a then b, slot j holds what slot b[j] held after a, i.e. particle a[b[j]]
        ancestors = outcome.ancestors if ancestors is None else ancestors[outcome.ancestors.to(ancestors.device)]
    if ancestors is not None:
        ctx.lineage.record(k, ancestors)


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
        _record(ctx, 0, outcome)
        dead = float(outcome.reborn.double().mean())
    extras["final_dead_fraction"] = dead
    return replace(state, log_weight=torch.zeros_like(state.log_weight)), extras


# --- the one driver --------------------------------------------------------------------------

def particle_loop(ctx: RunContext, kernel: ParticleKernel) -> ParticleState:
    """Denoise N particles from pure noise to t = 0, letting ``kernel.step`` act after each denoiser call
    and moving them with the context's transition."""
    sample_shape = tuple(ctx.denoiser.sample_shape)
    transition = ctx.transition
    x = ctx.initial_x()
    state = initial_state(x, n=ctx.config.n_particles).with_history(transition.initial_history(x))
    state = kernel.init(ctx, state)
    for info in ctx.grid:
        ctx.at_step(info)
        with record_function(STEP_RANGE):
            pred, dead = ctx.denoise(state.x, info.t, info.alpha_bar, info.k)
            state = replace(state, x0_hat=pred.x0, eps_hat=pred.eps)
            killed = None
            if dead is not None:
                if bool(dead.all()):
                    raise ctx.all_killed(info.k, info.t, state.n)
                state, killed = rebirth_killed(ctx, state, dead)
            stepped = kernel.step(ctx, info, state)
            if not isinstance(stepped, StepResult):
                raise TypeError(f"{type(kernel).__name__}.step must return a StepResult (state, trace, selection), "
                                f"got {type(stepped).__name__}")
            state, trace = stepped.state, stepped.trace
            _record(ctx, info.k, killed, stepped.selection)  # the driver alone writes the lineage
            noise = ctx.particle_noise(sample_shape) if transition.draws_noise else None
            moved = transition.step(info, state.x, Prediction(x0=state.x0_hat, eps=state.eps_hat), state.history,
                                    noise)
            state = replace(state, x=moved.x, history=moved.history)
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
                for k, ancestors in finished.ancestry:  # the search's selections, in order
                    ctx.lineage.record(k, ancestors)
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
    if weighting.reordered is not None:
        ctx.lineage.record(0, weighting.reordered)
    extras = dict(weighting.extras)
    if weighting.log_z_increment is not None:
        steps = sum(float(row.log_z_increment) for row in settle_trace(ctx.trace))
        extras["log_z"] = steps + float(weighting.log_z_increment)
    if weighting.log_w is None:
        return Finished(weighting.state, extras)
    state, extras = equalise_final(ctx, weighting.state, replace(weighting, extras=extras))
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
    extras = dict(extras or {})
    log_z = extras.pop("log_z", None)
    return SampleResult(
        log_z=log_z,
        samples=state.x,
        rewards=state.reward.detach().cpu(),
        log_weights=log_weights,
        lineage=ctx.lineage,
        trace=settle_trace(ctx.trace),
        cost=ctx.cost,
        config={"method": method, **ctx.config.as_dict()},
        extras=extras,
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
