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
Layout: :mod:`.contracts` (what a kernel or sampler promises), :mod:`.health` (faults and trace
rows), :mod:`.context` (randomness, model calls, bookkeeping), :mod:`.driver` (the loop,
selection, the result). This package re-exports the names samplers use.
"""

from __future__ import annotations

from fvdiffusion.errors import (
    AllParticlesDeadWarning, DenoiserError, NonFiniteDenoiserWarning, NonFiniteRewardWarning, RewardError,
)
from fvdiffusion.loop.context import (
    ACCELERATOR_BUDGET_SHARE, ACTIVATION_FACTOR, CPU_MEMORY_BUDGET, DENOISER_RANGE, REWARD_RANGE, STEP_RANGE,
    RunContext, auto_batch_rows,
)
from fvdiffusion.loop.contracts import FinalWeighting, Finished, ParticleKernel, Sampler, StepResult
from fvdiffusion.loop.driver import (
    call_fingerprint, equalise_final, make_result, particle_loop, rebirth_killed, run_kernel, select,
)
from fvdiffusion.loop.health import RunHealth, StepEvent, distinct_count, plain_trace, reward_stats, settle_trace
from fvdiffusion.schedule import StepInfo

__all__ = [
    "ParticleKernel", "Sampler", "FinalWeighting", "Finished", "StepResult", "RunContext", "RunHealth", "StepEvent", "StepInfo",
    "run_kernel", "particle_loop", "select", "rebirth_killed", "equalise_final", "make_result", "call_fingerprint",
    "plain_trace", "settle_trace", "reward_stats", "distinct_count", "auto_batch_rows",
    "ACTIVATION_FACTOR", "CPU_MEMORY_BUDGET", "ACCELERATOR_BUDGET_SHARE", "STEP_RANGE", "DENOISER_RANGE", "REWARD_RANGE",
    "DenoiserError", "RewardError", "NonFiniteRewardWarning", "AllParticlesDeadWarning", "NonFiniteDenoiserWarning",
]
