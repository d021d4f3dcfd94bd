"""Each method's error against the SNIS reference, in base standard deviations, with intervals.

For statistic s the standardised error of a method is (method mean − reference mean) / base std,
where the method mean averages its populations' means. Its interval comes from bootstrap
replicates that carry both sources of noise, paired across methods: the method's populations
are resampled (a population is the unit: its particles share ancestors), and the reference's
base samples are resampled and the SNIS estimate recomputed (the same reference replicates for
every method). A statistic is *flagged* when its 95% interval excludes 0: the method is
significantly off the exact tilt there.

The summary is the RMS of the standardised errors over statistics, with its interval, beside
the *noise RMS* — the RMS of the replicates' standard deviations, about what an exactly unbiased
method with these populations and this reference would show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from fvdiffusion.bench.common.paired_stats import Interval, percentile_interval, resample_counts
from fvdiffusion.bench.truth.snis import TiltedMoments, bootstrap_means

REFERENCE_LABEL = "snis-reference"


@dataclass(frozen=True, eq=False)
class Reference:
    """The SNIS tilted moments and ``replicates`` [B, S] of its mean from resampled base samples."""

    moments: TiltedMoments
    replicates: Tensor

    @classmethod
    def build(cls, stats: Tensor, names: tuple[str, ...], reward_statistic: str, lam: float, n_boot: int,
              seed: int = 0) -> "Reference":
        from fvdiffusion.bench.truth.snis import tilt

        moments = tilt(stats, names, reward_statistic, lam)
        log_w = lam * stats[:, tuple(names).index(reward_statistic)].to(torch.float64)
        reps = bootstrap_means(stats, log_w, n_boot, torch.Generator().manual_seed(seed))
        return cls(moments, reps)

    @property
    def bootstrap_se(self) -> Tensor:
        return self.replicates.std(0)


@dataclass(frozen=True)
class MethodScore:
    """One method's standardised errors over its populations."""

    label: str
    populations: int
    errors: dict[str, Interval]
    rms: Interval
    noise_rms: float
    flagged: tuple[str, ...]
    distinct_samples: float | None = None
    denoiser_calls: float | None = None
    wall_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "populations": self.populations,
                "errors": {k: _interval_dict(v) for k, v in self.errors.items()}, "rms": _interval_dict(self.rms),
                "noise_rms": self.noise_rms, "flagged": list(self.flagged), "distinct_samples": self.distinct_samples,
                "denoiser_calls": self.denoiser_calls, "wall_seconds": self.wall_seconds}


def _interval_dict(interval: Interval) -> dict[str, float]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def _score(label: str, names: tuple[str, ...], point: Tensor, reps: Tensor, populations: int,
           **extra: Any) -> MethodScore:
    errors = {name: percentile_interval(float(point[j]), reps[:, j]) for j, name in enumerate(names)}
    rms = percentile_interval(float(point.square().mean().sqrt()), reps.square().mean(1).sqrt())
    noise = float(reps.var(0).mean().sqrt()) if reps.shape[0] > 1 else float("nan")
    flagged = tuple(name for name, interval in errors.items() if interval.excludes(0.0))
    return MethodScore(label, populations, errors, rms, noise, flagged, **extra)


def score_method(label: str, rows: Sequence[dict[str, Any]], reference: Reference, n_boot: int,
                 seed: int = 0) -> MethodScore:
    """Errors of one method's population rows (all from the same config) against ``reference``."""
    names = reference.moments.names
    if not rows:
        raise ValueError(f"{label}: no populations to score")
    # a non-finite mean was stored as null (strict JSON); it reads back as NaN and shows as "–"
    means = torch.tensor([[_number(row["means"][name]) for name in names] for row in rows], dtype=torch.float64)
    scale = reference.moments.base_std
    point = (means.mean(0) - reference.moments.mean) / scale
    counts = resample_counts(len(rows), n_boot, torch.Generator().manual_seed(seed)).double()
    method_reps = counts @ means / len(rows)
    ref_reps = reference.replicates[:n_boot]
    if ref_reps.shape[0] < n_boot:
        raise ValueError(f"the reference has {ref_reps.shape[0]} bootstrap replicates, {n_boot} are needed")
    reps = (method_reps - ref_reps) / scale
    mean_of = lambda key: sum(float(r[key]) for r in rows) / len(rows)
    return _score(label, names, point, reps, len(rows), distinct_samples=mean_of("distinct_samples"),
                  denoiser_calls=mean_of("denoiser_calls"), wall_seconds=mean_of("wall_seconds"))


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def score_reference(reference: Reference) -> MethodScore:
    """The reference against itself: error 0 with the interval of its own noise (the sampler floor row)."""
    names = reference.moments.names
    reps = (reference.moments.mean - reference.replicates) / reference.moments.base_std
    return _score(REFERENCE_LABEL, names, torch.zeros(len(names), dtype=torch.float64), reps, 0)


def score_all(rows: Sequence[dict[str, Any]], labels: Sequence[str], reference: Reference,
              n_boot: int) -> list[MethodScore]:
    """The reference row, then every label with at least one population, in ``labels`` order."""
    scores = [score_reference(reference)]
    for label in labels:
        mine = [row for row in rows if row["label"] == label]
        if mine:  # the same population draws for every method: their seeds are shared, so are the draws
            scores.append(score_method(label, mine, reference, n_boot))
    return scores
