"""Bootstrap intervals over independent populations, and paired method-vs-baseline comparisons.

The unit of resampling is a *population* (one sampler run), never a sample: the samples of
one population share ancestors, so resampling samples would pretend they are independent and
give intervals that are too narrow. A cell's metric is recomputed on every bootstrap draw of
its populations (see ``bench.common.grouped_metrics``); this module only turns those replicates into
intervals and comparisons. Pure functions of tensors, no benchmark knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        return value < self.low or value > self.high

    def format(self, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
        e, lo, hi = (scale * v for v in (self.estimate, self.low, self.high))
        if math.isnan(e):
            return "–"
        return f"{e:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"


def resample_counts(n_groups: int, n_boot: int, generator: torch.Generator) -> Tensor:
    """[n_boot, n_groups] int64: how often each group is drawn when ``n_groups`` are drawn with replacement."""
    if n_groups < 1 or n_boot < 1:
        raise ValueError(f"need n_groups >= 1 and n_boot >= 1, got {n_groups}, {n_boot}")
    draws = torch.randint(n_groups, (n_boot, n_groups), generator=generator)
    counts = torch.zeros(n_boot, n_groups, dtype=torch.int64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws))


def percentile_interval(estimate: float, replicates: Tensor, level: float = LEVEL) -> Interval:
    """Percentile interval of the finite ``replicates`` [B], re-centred so their median is ``estimate``.

    Why re-centred: a bootstrap draw repeats some populations and leaves others out, so it has
    fewer distinct samples than the data, and FID grows as samples get fewer: the draws sit
    above the estimate, and a plain percentile interval can miss the estimate altogether. Their
    spread is the sampling variability wanted; their shift is an artefact of resampling.
    """
    reps = replicates.double()
    reps = reps[torch.isfinite(reps)]
    if reps.numel() == 0:
        return Interval(float(estimate), float("nan"), float("nan"))
    tail = (1.0 - level) / 2
    lo, mid, hi = torch.quantile(reps, torch.tensor([tail, 0.5, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(estimate), estimate + lo - mid, estimate + hi - mid)


def mean_interval(estimates: Tensor, replicates: Tensor, level: float = LEVEL) -> Interval:
    """Interval of the mean over cells: ``estimates`` [C], ``replicates`` [B, C] drawn independently per cell.

    Cells whose replicates never vary (one population each) are resampled as cells instead,
    as in :func:`paired_comparison`."""
    _check_shapes(estimates, replicates)
    return percentile_interval(float(estimates.double().mean()),
                               _cells_or_replicates(estimates.double(), replicates.double()).mean(dim=1), level)


def _no_spread(replicates: Tensor) -> bool:
    """True when no cell's replicates vary beyond rounding (one population per cell: every draw
    is that population; the grouped formula and the point estimate differ only in the last bits)."""
    reps = replicates.nan_to_num()
    spread = reps.amax(dim=0) - reps.amin(dim=0)
    return bool((spread <= 1e-6 * (1.0 + reps.abs().amax(dim=0))).all())


def _cells_or_replicates(points: Tensor, replicates: Tensor) -> Tensor:
    """``replicates`` [B, C], or — when no cell's replicates vary and C > 1 — B draws of C cells
    with replacement (a fixed generator: the same cells give the same interval)."""
    if points.numel() > 1 and _no_spread(replicates):
        draws = torch.randint(points.numel(), replicates.shape, generator=torch.Generator().manual_seed(points.numel()))
        return points[draws]
    return replicates


@dataclass(frozen=True)
class PairedComparison:
    """A method against a baseline over the cells both have.

    change: with ``relative``, the mean relative change in %, taken on the log scale: the
      geometric mean over cells of method / baseline, minus 1 (an arithmetic mean of per-cell
      ratios would let one cell with a tiny baseline value dominate); otherwise the mean of
      method − baseline. With the bootstrap interval of that mean.
    wins / losses / ties: cells where the method's point estimate is lower / higher / equal
      (lower is better). significant_*: cells whose own interval of the change excludes 0;
      None when the cells hold one population each (a cell alone then has no interval).
    """

    cells: int
    relative: bool
    change: Interval
    wins: int
    losses: int
    ties: int
    significant_wins: int | None
    significant_losses: int | None

    @property
    def win_margin(self) -> int:
        return self.wins - self.losses


def paired_comparison(method: Tensor, baseline: Tensor, method_reps: Tensor, baseline_reps: Tensor,
                      relative: bool = True, level: float = LEVEL) -> PairedComparison:
    """Compare per-cell metrics (lower is better): points [C], bootstrap replicates [B, C].

    Pair the replicates: column c of both must come from the same resampled populations of
    cell c when the two methods share population seeds, so the common noise cancels.

    When no cell's replicates vary (one population per cell: nothing to resample inside a
    cell), the interval of the change resamples the cells themselves instead: draw b takes C
    cells with replacement, so the interval says how much the mean change depends on which
    cells were run, rather than claiming a zero-width certainty.
    """
    _check_shapes(method, method_reps)
    _check_shapes(baseline, baseline_reps)
    if method.shape != baseline.shape or method_reps.shape != baseline_reps.shape:
        raise ValueError(f"method and baseline shapes differ: {tuple(method_reps.shape)} vs {tuple(baseline_reps.shape)}")
    m, b, mr, br = (t.double() for t in (method, baseline, method_reps, baseline_reps))
    if relative:  # log ratios: 0 means equal; non-positive values give NaN and drop out of the draws
        diff, diff_reps = (m / b).log(), (mr / br).log()
    else:
        diff, diff_reps = m - b, mr - br
    if diff.numel() > 1 and _no_spread(mr) and _no_spread(br):
        diff_reps_used = _cells_or_replicates(diff, diff.expand_as(diff_reps))
    else:
        diff_reps_used = diff_reps
    change = percentile_interval(float(diff.mean()), diff_reps_used.mean(dim=1), level)
    if relative:
        as_percent = lambda x: 100.0 * math.expm1(x)
        change = Interval(as_percent(change.estimate), as_percent(change.low), as_percent(change.high))
    per_cell = [percentile_interval(float(diff[c]), diff_reps[:, c], level) for c in range(diff.numel())]
    single = _no_spread(mr) and _no_spread(br)   # one population per cell: a cell has no interval
    return PairedComparison(
        cells=int(diff.numel()), relative=relative, change=change,
        wins=int((m < b).sum()), losses=int((m > b).sum()), ties=int((m == b).sum()),
        significant_wins=None if single else sum(ci.high < 0 for ci in per_cell),
        significant_losses=None if single else sum(ci.low > 0 for ci in per_cell),
    )


@dataclass(frozen=True)
class ClaimVerdict:
    """Where an interval of a relative change (%) stands against a claimed range [low, high] (%)."""

    interval: Interval
    claimed_low: float
    claimed_high: float

    @property
    def text(self) -> str:
        lo, hi = self.interval.low, self.interval.high
        if math.isnan(lo):
            return "no interval"
        direction = ("significantly better" if hi < 0 else "significantly worse" if lo > 0
                     else "not significantly different")
        if hi < self.claimed_low:
            claim = "better than the claimed range (the whole interval lies below it)"
        elif lo > self.claimed_high:
            claim = "the claim is not supported (the whole interval lies above the claimed range)"
        elif lo >= self.claimed_low and hi <= self.claimed_high:
            claim = "the interval lies inside the claimed range: it supports the claim"
        elif lo <= 0 <= hi:
            claim = "too wide to decide: the interval holds both the claimed range and no change"
        else:
            claim = "the interval overlaps the claimed range but is wider than it: consistent with the claim, not proof of it"
        return f"{direction}; {claim}"


def _check_shapes(points: Tensor, replicates: Tensor) -> None:
    if points.ndim != 1 or replicates.ndim != 2 or replicates.shape[1] != points.shape[0] or points.numel() == 0:
        raise ValueError(f"expected points [C] and replicates [B, C] with C >= 1, got {tuple(points.shape)} "
                         f"and {tuple(replicates.shape)}")
