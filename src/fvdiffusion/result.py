"""The one result type every sampler returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class StepTrace:
    """What happened at one denoising step (index k counts down from K to 1)."""

    step: int                       # k, K … 1
    t: int                          # training timestep t_k
    selected: bool                  # did a selection (resampling / birth-death) happen here
    ess: float                      # effective sample size / N of the weights used (1.0 if none)
    dead_fraction: float            # fraction of particles replaced at this step (0 if none)
    lam: float                      # λ in force
    kappa: float                    # selection strength κ (1 unless a controller moves it)
    distinct_roots: int             # distinct step-K roots among the live population
    reward_mean: float
    reward_max: float
    nonfinite_rewards: int          # rewards that were NaN/±inf (those particles got −inf potential)
    offspring_var: float = 0.0      # mean_i (O_i − N·W_i)² of this step's selection (0 if none)
    log_z_increment: float = 0.0    # log of this step's factor of the normalising-constant estimate

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Lineage:
    """Genealogy: ``parents[j][i]`` is the index (before selection j) of the parent of particle i.

    ``steps[j]`` is the denoising step k at which selection j happened (0 for a final
    selection on the clean samples). Any final particle's
    ancestor at any step is recovered by following ``parents`` backwards.
    """

    n_particles: int
    num_steps: int
    parents: list[Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def record(self, step: int, parents: Tensor) -> None:
        """Add a selection at ``step``; a second one at the same step (e.g. the rebirth of particles
        whose denoiser output was NaN, then the policy's selection) is composed into one record."""
        parents = parents.detach().long()  # stays on its device until settle(): no host read in the loop
        if self.steps and self.steps[-1] == step:
            self.parents[-1] = self.parents[-1][parents]
            return
        self.parents.append(parents)
        self.steps.append(step)

    def settle(self) -> None:
        """Move every record to the CPU (once, after the run)."""
        if self.parents:
            self.parents = list(torch.stack(self.parents).cpu().unbind(0))  # one transfer

    def ancestors_at(self, step: int) -> Tensor:
        """Index of each final particle's ancestor in the population *entering* step ``step``.

        Selections run in the order k = K … 1 and each happens after the denoiser call of its
        step, so the ancestor entering step k is found by undoing selections at steps 1 … k.
        """
        idx = torch.arange(self.n_particles)
        for k, parents in zip(reversed(self.steps), reversed(self.parents)):
            if k <= step:
                idx = parents[idx]
        return idx

    def genealogy_curve(self) -> list[int]:
        """Distinct step-k ancestors of the final population, listed for k = K … 1."""
        by_step = dict(zip(self.steps, self.parents))
        idx = torch.arange(self.n_particles)
        if 0 in by_step:  # a final selection on r(x0) happens after step 1
            idx = by_step[0][idx]
        counts = []
        for k in range(1, self.num_steps + 1):
            if k in by_step:
                idx = by_step[k][idx]
            counts.append(int(idx.unique().numel()))
        return counts[::-1]

    def distinct_lineages(self) -> int:
        """Distinct ancestors of the final population at the middle step K/2 (the table metric)."""
        if self.num_steps == 0:
            return self.n_particles
        curve = self.genealogy_curve()  # index 0 is k = K
        mid_k = max(1, self.num_steps // 2)
        return curve[self.num_steps - mid_k]


def distinct_rows(samples: Tensor, tol: float = 1e-6) -> Tensor:
    """Index of one representative per group of near-identical samples, in first-seen order.

    Two samples are duplicates when max|a − b| <= tol·(1 + max|a|) (a relative tolerance,
    so it works for latents and pixels alike). Greedy: each sample joins the first
    representative it matches; O(N·distinct) distance checks on the flattened rows.
    """
    flat = samples.detach().reshape(samples.shape[0], -1).to("cpu", torch.float64)
    reps = torch.empty_like(flat)  # representatives so far, filled in order
    keep: list[int] = []
    for i in range(flat.shape[0]):
        row = flat[i]
        if keep:
            gap = (reps[: len(keep)] - row).abs().amax(dim=1)
            if bool((gap <= tol * (1.0 + row.abs().max())).any()):
                continue
        reps[len(keep)] = row
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


@dataclass(frozen=True)
class Diversity:
    """Diversity of a final population that copies cannot inflate.

    distinct_samples: final samples with duplicates (within a tolerance) counted once.
    distinct_midpoint_ancestors: distinct step-K/2 ancestors among the distinct samples.
    distinct_roots: distinct initial particles (step-K roots) among the distinct samples.
    A population of N copies of one point scores 1 on each.
    """

    distinct_samples: int
    distinct_midpoint_ancestors: int
    distinct_roots: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Cost:
    """Everything the run paid for. Calls count particles (rows), not batches."""

    denoiser_calls: int = 0
    reward_calls: int = 0
    wall_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    extra: dict[str, int] = field(default_factory=dict)  # adapter counters, e.g. VAE decodes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampleResult:
    samples: Tensor            # [N, ...] final x0
    rewards: Tensor            # [N] reward of the final samples
    log_weights: Tensor        # [N] normalised; uniform after a final selection
    lineage: Lineage
    trace: list[StepTrace]
    cost: Cost
    config: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific (e.g. DTS anytime curve)
    # log Ẑ, the method's estimate of log E_p[exp(λ r(x0))] under the K-step base sampler p (smc,
    # vasr, fvd; None for methods that estimate none). docs/method.md says what each one estimates.
    log_z: float | None = None

    def running_log_z(self) -> list[float] | None:
        """log Ẑ after each step, k = K … 1 (the final weighting's factor is in ``log_z`` only)."""
        if self.log_z is None:
            return None
        total, path = 0.0, []
        for row in self.trace:
            total += row.log_z_increment
            path.append(total)
        return path

    def distinct_lineages(self) -> int:
        """Slot count of distinct K/2 ancestors: copies inflate it; prefer :meth:`diversity`."""
        return self.lineage.distinct_lineages()

    def diversity(self, tol: float = 1e-6) -> Diversity:
        """Distinct samples, and distinct K/2 ancestors and roots among those distinct samples."""
        keep = distinct_rows(self.samples, tol)
        steps = self.lineage.num_steps
        mid = self.lineage.ancestors_at(max(1, steps // 2))[keep] if steps else keep
        roots = self.lineage.ancestors_at(steps)[keep] if steps else keep
        return Diversity(
            distinct_samples=int(keep.numel()),
            distinct_midpoint_ancestors=int(mid.unique().numel()),
            distinct_roots=int(roots.unique().numel()),
        )

    def summary(self) -> dict[str, Any]:
        """JSON-friendly metrics of the run."""
        finite = self.rewards[torch.isfinite(self.rewards)]
        return {
            "method": self.config.get("method"),
            "n_particles": int(self.samples.shape[0]),
            "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward_max": float(finite.max()) if finite.numel() else float("nan"),
            "distinct_lineages": self.distinct_lineages(),
            **self.diversity().as_dict(),
            "nonfinite_rewards": int(self.extras.get("health", {}).get("nonfinite_rewards", 0)),
            "nonfinite_denoiser": int(self.extras.get("health", {}).get("nonfinite_denoiser", 0)),
            **{f"cost_{k}": v for k, v in self.cost.as_dict().items() if k != "extra"},
            **{f"cost_{k}": v for k, v in self.cost.extra.items()},
        }
