"""Everything known about one sampler type, read from the output folder: base sample, reference, scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvdiffusion.bench.truth.compare import load_rows
from fvdiffusion.bench.truth.config import MIN_ESS, MIN_SHIFT, CompareConfig, ReferenceConfig
from fvdiffusion.bench.truth.reference import BaseSample, load_base
from fvdiffusion.bench.truth.scoring import MethodScore, Reference, score_all
from fvdiffusion.bench.truth.testbed import TruthTestbed


@dataclass(frozen=True, eq=False)
class SamplerOutcome:
    """One sampler type: its base sample, the SNIS reference (None below 2 samples), the population
    rows of the compared methods and their scores (None without a reference or rows)."""

    reference_cfg: ReferenceConfig
    compare_cfg: CompareConfig
    reward_statistic: str
    base: BaseSample
    reference: Reference | None
    rows: list[dict[str, Any]]
    scores: list[MethodScore] | None

    @property
    def sampler(self) -> str:
        return self.reference_cfg.sampler

    @property
    def reward_shift(self) -> float | None:
        if self.reference is None:
            return None
        return float(self.reference.moments.shift()[self.base.names.index(self.reward_statistic)])

    @property
    def ess_met(self) -> bool:
        return self.reference is not None and self.reference.moments.ess >= MIN_ESS

    @property
    def shift_met(self) -> bool:
        return self.reward_shift is not None and abs(self.reward_shift) >= MIN_SHIFT


def collect(testbed: TruthTestbed, reference_cfg: ReferenceConfig, compare_cfg: CompareConfig, out_dir: Path,
            n_boot: int) -> SamplerOutcome:
    """Read the base shards and population rows of these configs from ``out_dir`` and score them."""
    base = load_base(testbed, reference_cfg, out_dir)
    reference = None
    if base.n >= 2:
        reference = Reference.build(base.stats, testbed.names, testbed.reward_statistic, compare_cfg.lam, n_boot)
    rows = load_rows(testbed, compare_cfg, out_dir)
    scores = None
    if reference is not None and rows:
        scores = score_all(rows, [spec.label for spec in compare_cfg.methods], reference, n_boot)
    return SamplerOutcome(reference_cfg, compare_cfg, testbed.reward_statistic, base, reference, rows, scores)


def reference_json(outcomes: list[SamplerOutcome]) -> dict[str, Any]:
    """The machine-readable reference: per sampler type, the SNIS moments with both standard errors."""
    out: dict[str, Any] = {}
    for o in outcomes:
        entry: dict[str, Any] = {"steps": o.reference_cfg.steps, "eta": o.reference_cfg.eta,
                                 "base_samples_target": o.reference_cfg.base_samples,
                                 "shard_size": o.reference_cfg.shard_size, "shards_done": o.base.shards_done,
                                 "shards_total": o.base.shards_total, "reward_statistic": o.reward_statistic}
        if o.reference is not None:
            entry.update(o.reference.moments.as_dict())
            for j, name in enumerate(o.base.names):
                entry["statistics"][name]["tilted_se_bootstrap"] = float(o.reference.bootstrap_se[j])
            entry.update(ess_met=o.ess_met, shift_met=o.shift_met, reward_shift=o.reward_shift)
        out[o.sampler] = entry
    return out
