"""The engine's contracts: what a population kernel and a search sampler promise the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

from fvdiffusion.population import ParticleState
from fvdiffusion.result import StepTrace
from fvdiffusion.schedule import StepInfo
from fvdiffusion.selection import Selection

if TYPE_CHECKING:
    from fvdiffusion.loop.context import RunContext


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
    reordered: Tensor | None = None  # slot i of ``state`` holds particle reordered[i] (e.g. a ranking)
    # log of the normalising-constant increment of the final weighting (None: the method estimates none)
    log_z_increment: Tensor | float | None = None


@dataclass(frozen=True)
class StepResult:
    """What a kernel's step returns: the population, its trace row and the step's selection.

    ``selection`` (ancestors, reborn slots) is None when the step selected nothing; the driver,
    the only writer of the lineage, records it. The step's log normalising-constant increment is
    the trace row's ``log_z_increment``.
    """

    state: ParticleState
    trace: StepTrace
    selection: Selection | None = None


@dataclass(frozen=True)
class Finished:
    """A sampler's final population (x = samples, reward = their rewards, log_weight = weights).

    ``ancestry``: the (step k, ancestors) records of the search, in the order they happened; the
    driver writes them into the lineage.
    """

    state: ParticleState
    extras: dict[str, Any] = field(default_factory=dict)
    ancestry: tuple[tuple[int, Tensor], ...] = ()


@runtime_checkable
class ParticleKernel(Protocol):
    """A population method: one move per denoising step and a final weighting."""

    requires_final_reward: bool  # False: r(x0) only when a reward was given (base)

    def init(self, ctx: "RunContext", state: ParticleState) -> ParticleState:
        """The population before the first step (e.g. the run scalars a controller needs)."""

    def step(self, ctx: "RunContext", info: StepInfo, state: ParticleState) -> StepResult:
        """Act after the denoiser call of step ``info`` (x̂0, ε̂ are in the state)."""

    def finish(self, ctx: "RunContext", state: ParticleState) -> FinalWeighting:
        """The final weighting of the samples (state.x = x0, state.reward = r(x0))."""


@runtime_checkable
class Sampler(Protocol):
    """A tree or candidate method: runs its own search over the context's grid."""

    def run(self, ctx: "RunContext") -> Finished: ...
