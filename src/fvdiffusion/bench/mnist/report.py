"""results.md: FID and KID per feature space with population-bootstrap intervals, paired
comparisons with win counts, the claim check, diversity that copies cannot inflate, cost,
tuning, and the reproduce command."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fvdiffusion.bench.common.paired_stats import (
    ClaimVerdict, Interval, PairedComparison, mean_interval, paired_comparison,
)
from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.common.stats import markdown_table
from fvdiffusion.bench.mnist.config import MnistBenchConfig, preset_name
from fvdiffusion.bench.mnist.methods import REAL_LABEL, describe
from fvdiffusion.bench.mnist.run import BenchOutcome, TuningScore
from fvdiffusion.bench.mnist.scoring import Scorer

CLAIMED_FID_CHANGE = (-20.0, -14.0)   # the method's own report, % FID against SMC
KID_SCALE = 1e3
# A solver row "matches" the fvd row in a space when its FID is not higher and the interval of
# the change stays below this (%): fewer steps must not buy a loss the data cannot rule out.
SOLVER_MATCH_UPPER = 10.0
BASELINES = ("smc-multinomial", "smc-fk", "smc-ess", "smc-systematic", "smc-ess-systematic", "vasr",
             "smc-tuned", "smc-fk-tuned", "smc-ess-tuned", "vasr-tuned")
DIVERSITY_FIELDS = ("distinct_samples", "distinct_midpoint_ancestors", "distinct_roots", "slot_lineages")


@dataclass(frozen=True)
class CellSet:
    """One label's scored cells, in a fixed (class, seed) order shared by every label."""

    cells: list[tuple[int, int]]
    fid: dict[str, torch.Tensor]            # space -> [C]
    kid: dict[str, torch.Tensor]
    fid_replicates: dict[str, torch.Tensor]  # space -> [B, C]
    kid_replicates: dict[str, torch.Tensor]
    populations: list[int]


@dataclass(frozen=True)
class LabelSummary:
    """One table row: class-and-seed means over the complete cells, with population-bootstrap intervals."""

    label: str
    family: str
    group: str
    budget: int | None
    note: str
    same_as: str | None          # an earlier label with the identical resolved config
    cell_set: CellSet
    fid: dict[str, Interval]
    kid: dict[str, Interval]
    fid_by_class: dict[str, dict[int, float]]
    accuracy: float
    reward: float
    diversity: dict[str, float | None]   # mean per population
    per_population: float                # samples returned per population
    calls_per_sample: float
    reward_calls_per_sample: float
    wall_per_population: float
    genealogy: list[float] | None


def complete_cells(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(class, seed) pairs that every label with any row has a row for."""
    by_label: dict[str, set[tuple[int, int]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], set()).add((r["class"], r["seed"]))
    return sorted(set.intersection(*by_label.values())) if by_label else []


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarise(outcome: BenchOutcome, scorer: Scorer) -> list[LabelSummary]:
    cells = complete_cells(outcome.rows)
    index = {(r["label"], r["class"], r["seed"]): r for r in outcome.rows}
    first_label_of: dict[str, str] = {}
    out = []
    for planned in outcome.plan:
        label = planned.spec.label
        mine = [index[(label, c, s)] for c, s in cells if (label, c, s) in index]
        if not mine or len(mine) < len(cells):
            continue
        scores = [scorer.score(r) for r in mine]
        stack = lambda name, space: torch.tensor([getattr(sc, name)[space] for sc in scores], dtype=torch.float64)
        reps = lambda name, space: torch.stack([getattr(sc, name)[space] for sc in scores], dim=1)
        cell_set = CellSet(cells, {s: stack("fid", s) for s in scorer.spaces}, {s: stack("kid", s) for s in scorer.spaces},
                           {s: reps("fid_replicates", s) for s in scorer.spaces},
                           {s: reps("kid_replicates", s) for s in scorer.spaces}, [sc.populations for sc in scores])
        pops = [p for r in mine for p in r["per_population"]]
        n_samples = sum(p["n"] for p in pops)
        curves = [r["genealogy"] for r in mine if r.get("genealogy")]
        same_as = first_label_of.setdefault(mine[0]["resolved"], label)
        out.append(LabelSummary(
            label=label, family=planned.family, group=planned.group, budget=planned.budget, note=planned.spec.note,
            same_as=None if same_as == label else same_as, cell_set=cell_set,
            fid={s: mean_interval(cell_set.fid[s], cell_set.fid_replicates[s]) for s in scorer.spaces},
            kid={s: mean_interval(cell_set.kid[s], cell_set.kid_replicates[s]) for s in scorer.spaces},
            fid_by_class={s: {c: _mean([float(v) for (cc, _), v in zip(cells, cell_set.fid[s]) if cc == c])
                              for c in sorted({c for c, _ in cells})} for s in scorer.spaces},
            accuracy=_mean([sc.accuracy for sc in scores]),
            reward=_mean([p["reward_mean"] for p in pops]),
            diversity={f: _mean([p[f] for p in pops]) for f in DIVERSITY_FIELDS},
            per_population=n_samples / len(pops),
            calls_per_sample=sum(r["denoiser_calls"] for r in mine) / n_samples,
            reward_calls_per_sample=sum(r["reward_calls"] for r in mine) / n_samples,
            wall_per_population=sum(r["wall_seconds"] for r in mine) / len(pops),
            genealogy=torch.tensor(curves, dtype=torch.float64).mean(0).tolist() if curves else None,
        ))
    return out


def compare(a: LabelSummary, b: LabelSummary, space: str, metric: str) -> PairedComparison:
    """``a`` against ``b`` over their common cells: FID relative (%), KID absolute."""
    sa, sb = a.cell_set, b.cell_set
    return paired_comparison(getattr(sa, metric)[space], getattr(sb, metric)[space],
                             getattr(sa, f"{metric}_replicates")[space], getattr(sb, f"{metric}_replicates")[space],
                             relative=metric == "fid")


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: float, reference: float) -> str:
    if reference is None or reference == 0 or math.isnan(reference) or math.isnan(value):
        return "–"
    return f"{100 * (value / reference - 1):+.1f}%"


def _settings(cfg: MnistBenchConfig, outcome: BenchOutcome, scorer: Scorer, summaries: list[LabelSummary],
              command: str) -> list[str]:
    preset = preset_name(cfg)
    cells = summaries[0].cell_set.cells if summaries else []
    devices = sorted({f"{r['device']}" + (f" ({r['threads']} torch thread(s) per process)" if r["device"] == "cpu" else "")
                      for r in outcome.rows})
    lines = ["# MNIST class-conditional benchmark\n"]
    if preset == "cpu":
        full = MnistBenchConfig.preset("gpu")
        lines.append(f"**CPU-reduced configuration** (`--preset cpu`): {len(cfg.classes)} classes, N = {cfg.n_particles}, "
                     f"K = {cfg.num_steps}, {cfg.samples_per_cell} samples per cell, the main rows only, "
                     f"{cfg.grid_points} grid points per tuned family. It is not the full benchmark (`--preset gpu`: "
                     f"{len(full.classes)} classes, K = {full.num_steps}, {full.samples_per_cell} samples per cell, "
                     f"{full.grid_points} grid points per family); read its intervals as such.\n")
    elif preset == "quick":
        lines.append("**Quick smoke configuration** (`--quick`): tiny populations and few steps; it exercises every code "
                     "path and its numbers are not evidence.\n")
    pops = sorted({p for s in summaries for p in s.cell_set.populations})
    lines += [
        f"Task: r(x) = log p(c | x̂0) from the reward classifier, λ = 1, so the exact target is the class-c data "
        f"distribution. N = {cfg.n_particles} particles, K = {cfg.num_steps} "
        f"{sampler_name(cfg.eta)} "
        f"steps for every method. A cell (method, class, seed) "
        f"pools {'/'.join(map(str, pops))} independent populations (at least {cfg.samples_per_cell} samples); population p "
        f"of every method starts from the same seed. Classes {list(cfg.classes)}, reported seeds {list(cfg.seeds)} "
        f"(tuning seed {TUNING_SEED} is never reported); device {', '.join(devices) or '–'}.",
        f"Cells in the tables: {len(cells)} (class, seed) pairs (only pairs every row finished).\n",
        f"FID and KID are measured against the held-out real digits of class c in each feature space "
        f"({', '.join(scorer.spaces)}; see `metrics/feature_spaces.py`: `evalnet` is the augmentation-trained evaluation "
        f"network, blind to within-class variety; `ae` is an autoencoder trained without augmentation that sees it; "
        f"`mlp` is the penultimate layer of an MLP classifier trained without augmentation, the held-out judge: "
        f"tuning reads only `ae` and `evalnet`). "
        f"FID is torchmetrics' Fréchet distance; KID (×10³) is the unbiased MMD² with the cubic kernel on the whole "
        f"pooled set. Each value is the mean over cells; [brackets] are 95% percentile intervals from {cfg.bootstrap} "
        f"bootstrap draws of each cell's populations (never of single samples: a population's samples share "
        f"ancestors). Small sample sets bias FID upward; compare rows, and see `{REAL_LABEL}` for the floor.",
        "`smc-fk` is SMC as FK steering's released scripts run it (github.com/zacharyhorvitz/Fk-Diffusion-Steering, "
        "text_to_image/launch.sh: resample every 20 of 100 steps from step 20 to 80, and at the last step, "
        "multinomial): here every round(K/5) steps from round(0.2K) to round(0.8K), plus the final selection, with "
        "their default potential `diff`; λ stays 1 because it defines the target (theirs: 10 or 2 for ImageReward). "
        "Every tuned family ran the same number of grid points on seed 0 (see Tuning).",
        "Diversity per population (copies cannot inflate it): distinct samples (duplicates counted once), distinct "
        "step-K/2 ancestors among them, distinct initial roots among them; 'slots K/2' is the old count of distinct "
        "K/2 ancestors over all N slots, which copies do inflate.",
    ]
    for space, reason in scorer.unavailable.items():
        lines.append(f"\nFeature space `{space}` not scored: {reason}.")
    if command:
        lines.append(f"\nReproduce (resumes from results.jsonl): `{command}`\n")
    return lines


def _quality_table(summaries: list[LabelSummary], space: str, reference: LabelSummary | None) -> str:
    header = ["method", "FID [95% CI]", f"ΔFID vs {reference.label if reference else '–'}", "KID×10³ [95% CI]", "note"]
    rows = []
    for s in summaries:
        note = s.note + (f" (same cells as {s.same_as})" if s.same_as else "")
        rows.append([s.label, s.fid[space].format(2), _pct(s.fid[space].estimate, reference.fid[space].estimate)
                     if reference else "–", s.kid[space].format(2, KID_SCALE), note])
    return markdown_table(header, rows)


def _diversity_table(summaries: list[LabelSummary]) -> str:
    header = ["method", "acc", "reward", "samples / pop", "distinct samples", "distinct K/2 ancestors",
              "distinct roots", "slots K/2", "calls/sample", "wall s / pop"]
    rows = [[s.label, _f(s.accuracy, 3), _f(s.reward, 2), _f(s.per_population, 0)]
            + [_f(s.diversity[f], 1) for f in DIVERSITY_FIELDS]
            + [_f(s.calls_per_sample, 0), _f(s.wall_per_population, 1)] for s in summaries]
    return markdown_table(header, rows)


def comparison_pairs(by_label: dict[str, LabelSummary]) -> list[tuple[str, str]]:
    """FVD's defaults against every baseline; tuned FVD against FK's schedule and every tuned baseline."""
    tuned = tuple(b for b in BASELINES if b.endswith("-tuned"))
    wanted = [("fvd", b) for b in BASELINES] + [("fvd-tuned", b) for b in ("smc-fk", *tuned)]
    return [(a, b) for a, b in wanted if a in by_label and b in by_label]


def _comparison_table(by_label: dict[str, LabelSummary], space: str) -> str:
    header = ["method − baseline", "cells", "FID change % [95% CI]", "FID wins / losses / ties", "significant W / L",
              "KID×10³ change [95% CI]", "KID wins / losses"]
    rows = []
    for a, b in comparison_pairs(by_label):
        f, k = compare(by_label[a], by_label[b], space, "fid"), compare(by_label[a], by_label[b], space, "kid")
        rows.append([f"{a} − {b}", f.cells, f.change.format(1), f"{f.wins} / {f.losses} / {f.ties}",
                     "–" if f.significant_wins is None else f"{f.significant_wins} / {f.significant_losses}",
                     k.change.format(2, KID_SCALE),
                     f"{k.wins} / {k.losses}"])
    return markdown_table(header, rows) if rows else "No FVD-against-SMC pairs in this run.\n"


def claim_lines(by_label: dict[str, LabelSummary], spaces: tuple[str, ...], strongest_smc: str | None) -> list[str]:
    lo, hi = CLAIMED_FID_CHANGE
    out = [f"The method's claim: {-hi:.0f}–{-lo:.0f}% lower FID than strong SMC baselines. Each line gives the "
           "mean relative FID change over cells (geometric mean of the per-cell FID ratios, minus 1) with its 95% "
           "population-bootstrap interval, and where that interval stands against the claimed range.\n"]
    pairs = [("fvd", "smc-fk", "FVD's defaults against SMC as FK steering's released scripts run it"),
             ("fvd", "smc-multinomial", "FVD's defaults against SMC resampling every step"),
             ("fvd", strongest_smc, f"FVD's defaults against the strongest tuned SMC ({strongest_smc}, chosen on seed 0)"),
             ("fvd-tuned", strongest_smc, "tuned FVD against the strongest tuned SMC")]
    for a, b, text in pairs:
        if b is None or a not in by_label or b not in by_label:
            continue
        for space in spaces:
            c = compare(by_label[a], by_label[b], space, "fid")
            verdict = ClaimVerdict(c.change, lo, hi).text
            out.append(f"- {text}, `{space}` space: FID {by_label[a].fid[space].estimate:.2f} vs "
                       f"{by_label[b].fid[space].estimate:.2f}; change {c.change.format(1, suffix='%')}; FVD lower in "
                       f"{c.wins} of {c.cells} cells{_significance(c)}: {verdict}.")
    return out if len(out) > 1 else ["Not enough rows for the claim check."]


def _significance(c) -> str:
    """' (k significantly, j significantly higher)', or nothing when cells hold one population each."""
    if c.significant_wins is None:
        return ""
    return f" ({c.significant_wins} significantly, {c.significant_losses} significantly higher)"


def value_based_lines(summaries: list[LabelSummary], fvd: LabelSummary | None, space: str) -> list[str]:
    value = [s for s in summaries if s.group == "value"]
    if not value:
        return ["No value-based rows were run."]
    if fvd is None:
        return ["No fvd row to compare against."]
    ref = fvd.fid[space].estimate
    out = [f"FVD: FID ({space}) {ref:.2f}, {fvd.calls_per_sample:.0f} denoiser calls per sample, "
           f"{fvd.wall_per_population:.1f} s per population. A budget *matches* FVD when its FID is at most FVD's.\n"]
    out.append(markdown_table(["method", "budget", f"FID ({space}) [95% CI]", "calls/sample", "wall s / pop",
                               "wall / fvd wall", "matches fvd"], [
        [s.label, s.budget, s.fid[space].format(2), _f(s.calls_per_sample, 0), _f(s.wall_per_population, 1),
         (_f(s.wall_per_population / fvd.wall_per_population, 1) + "x") if fvd.wall_per_population > 0 else "–",
         "yes" if s.fid[space].estimate <= ref else "no"] for s in value]))
    for family, unit in (("svdd", "M"), ("dts", "rollouts")):
        rows = sorted((s for s in value if s.family == family), key=lambda s: s.budget)
        if not rows:
            continue
        match = next((s for s in rows if s.fid[space].estimate <= ref), None)
        pick = match or min(rows, key=lambda s: s.fid[space].estimate)
        head = (f"- {family} first matches FVD's FID at {unit} = {match.budget}" if match else
                f"- no {family} budget tried matches FVD's FID; its best ({unit} = {pick.budget})")
        out.append(f"{head} (FID {pick.fid[space].estimate:.2f}) took {pick.wall_per_population / fvd.wall_per_population:.1f}x "
                   f"FVD's wall time and {pick.calls_per_sample / fvd.calls_per_sample:.1f}x its denoiser calls.")
    return out


def sampler_name(eta: float) -> str:
    """The DDIM-family sampler a run's eta gives (what the K-step rows use)."""
    return "DDPM" if eta == 1.0 else "deterministic DDIM (η = 0)" if eta == 0.0 else f"DDIM(η = {eta:g})"


def solver_name(eta: float) -> str:
    if eta == 0.0:
        return "a multistep ODE solver (DPM-Solver++(2M) or UniPC, η = 0)"
    return f"SDE-DPM-Solver++(2M) (η = {eta:g})"


def solver_matches(change: Interval) -> bool:
    """FID not higher, and the interval's upper end at most +SOLVER_MATCH_UPPER % (NaN never matches)."""
    return change.estimate <= 0.0 and change.high <= SOLVER_MATCH_UPPER


def calls_saved(solver: LabelSummary, fvd: LabelSummary) -> str:
    if not fvd.calls_per_sample:
        return "–"
    return f"{100 * (1 - solver.calls_per_sample / fvd.calls_per_sample):.0f}%"


def solver_lines(summaries: list[LabelSummary], fvd: LabelSummary | None, spaces: tuple[str, ...],
                 cfg: MnistBenchConfig) -> list[str]:
    """Each solver row against the fvd row: paired FID change per space and the denoiser calls saved."""
    solver = [s for s in summaries if s.group == "solver"]
    if not solver:
        return ["No solver row finished."]
    if fvd is None:
        return ["No fvd row to compare against."]
    out = [f"FVD's defaults moved by {solver_name(cfg.eta)} on fewer steps, against the `fvd` row's "
           f"{cfg.num_steps} {sampler_name(cfg.eta)} steps, on the same population seeds. FID change: paired, "
           "geometric mean of the per-cell ratios minus 1, with its 95% population-bootstrap interval; wins: cells "
           f"where the solver's FID is lower. *Matches* in a space: FID change ≤ 0 and the interval's upper end ≤ "
           f"+{SOLVER_MATCH_UPPER:g}%.\n"]
    header = ["method − fvd", "space", "FID", "fvd FID", "FID change % [95% CI]", "wins / losses / ties",
              "significant W / L", "calls/sample", "fvd calls/sample", "calls saved", "matches fvd"]
    rows, verdicts = [], []
    for s in solver:
        misses = []
        for space in spaces:
            c = compare(s, fvd, space, "fid")
            if not solver_matches(c.change):
                misses.append(f"`{space}` ({c.change.format(1, suffix='%')})")
            rows.append([f"{s.label} − fvd", space, s.fid[space].format(2), _f(fvd.fid[space].estimate, 2),
                         c.change.format(1), f"{c.wins} / {c.losses} / {c.ties}",
                         "–" if c.significant_wins is None else f"{c.significant_wins} / {c.significant_losses}",
                         _f(s.calls_per_sample, 0), _f(fvd.calls_per_sample, 0), calls_saved(s, fvd),
                         "yes" if solver_matches(c.change) else "no"])
        verdicts.append(_solver_verdict(s, fvd, spaces, misses))
    return out + [markdown_table(header, rows)] + verdicts


def _solver_verdict(solver: LabelSummary, fvd: LabelSummary, spaces: tuple[str, ...], misses: list[str]) -> str:
    saved = f"{calls_saved(solver, fvd)} fewer denoiser calls per sample"
    if not misses:
        return f"- {solver.label} matches fvd in every feature space ({', '.join(spaces)}) with {saved}."
    return f"- {solver.label} ({saved}) does not match fvd in: {', '.join(misses)}."


def tuning_lines(tuning: list[TuningScore], cfg: MnistBenchConfig, spaces: tuple[str, ...]) -> list[str]:
    if not tuning:
        return ["Tuning was off."]
    header = ["family", "options"] + [f"FID ({s})" for s in spaces] + ["worst ratio", ""]
    rows = [[t.family, describe(t.options)] + [_f(t.fid.get(s) if t.fid else None, 2) for s in spaces]
            + [_f(t.worst_ratio, 3), "chosen" if t.chosen else ""] for t in tuning]
    return [f"Every family ran its first {cfg.grid_points} grid points on seed {TUNING_SEED}, classes "
            f"{list(cfg.tuning_classes)}, {cfg.tuning_samples} samples per cell; each point's FID is the mean over those "
            "classes. The choice rule, declared before the run: the point whose worst ratio to its family's best FID "
            "over the feature spaces is smallest (ties: the earlier point). The chosen points are the `-tuned` rows.\n",
            markdown_table(header, rows)]


def findings(by_label: dict[str, LabelSummary], summaries: list[LabelSummary], space: str) -> list[str]:
    out = []
    ranked = sorted((s for s in summaries if s.group in ("main", "tuned", "ablation") and s.same_as is None),
                    key=lambda s: s.fid[space].estimate)
    if ranked:
        out.append(f"- Ranking by FID ({space}): " + ", ".join(f"{s.label} {s.fid[space].estimate:.2f}" for s in ranked) + ".")
    fvd, smc = by_label.get("fvd"), by_label.get("smc-multinomial")
    if fvd and smc and fvd.diversity["distinct_midpoint_ancestors"] and smc.diversity["distinct_midpoint_ancestors"]:
        f, s = fvd.diversity, smc.diversity
        out.append(f"- Distinct samples per population: fvd {f['distinct_samples']:.1f} vs smc-multinomial "
                   f"{s['distinct_samples']:.1f}; distinct K/2 ancestors among them {f['distinct_midpoint_ancestors']:.1f} "
                   f"vs {s['distinct_midpoint_ancestors']:.1f}; distinct roots {f['distinct_roots']:.1f} vs "
                   f"{s['distinct_roots']:.1f}.")
    real = by_label.get(REAL_LABEL)
    if real:
        out.append(f"- Floor: real training digits score FID ({space}) {real.fid[space].format(2)} at "
                   f"{real.per_population:.0f} samples per population.")
    return out or ["Not enough rows for findings."]


def mnist_report(outcome: BenchOutcome, cfg: MnistBenchConfig, scorer: Scorer, command: str = "",
                 summaries: list[LabelSummary] | None = None) -> str:
    summaries = summaries if summaries is not None else summarise(outcome, scorer)
    by_label = {s.label: s for s in summaries}
    primary = scorer.primary
    lines = _settings(cfg, outcome, scorer, summaries, command)
    reference = by_label.get("smc-fk") or by_label.get("smc-multinomial")
    table_rows = [s for s in summaries if s.group != "value"]
    for space in scorer.spaces:
        lines.append(f"\n## FID and KID in the `{space}` space\n\n" + _quality_table(table_rows, space, reference))
    lines.append("\n## Diversity and cost\n\n" + _diversity_table(table_rows))
    lines.append("\n## The claim\n")
    lines += claim_lines(by_label, scorer.spaces, outcome.strongest_smc)
    for space in scorer.spaces:
        lines.append(f"\n## Paired comparisons, `{space}` space\n\nPer (class, seed) cell, method minus baseline on the "
                     "same population seeds; the interval resamples the same populations of both. FID change: geometric "
                     "mean of the per-cell ratios, minus 1; KID change: mean difference. Wins: cells where the method's "
                     "value is lower; significant: the cell's own interval excludes no change.\n\n"
                     + _comparison_table(by_label, space))
    classes = sorted({c for c, _ in summaries[0].cell_set.cells}) if summaries else []
    per_class = [[s.label] + [_f(s.fid_by_class[primary].get(c), 2) for c in classes]
                 for s in summaries if s.group in ("real", "main", "tuned")]
    lines.append(f"\n## FID per class (`{primary}` space, mean over seeds)\n\n"
                 + markdown_table(["method"] + [str(c) for c in classes], per_class))
    lines.append("\n## Value-based search against FVD\n")
    lines += value_based_lines(summaries, by_label.get("fvd"), primary)
    if cfg.solver_steps or any(s.group == "solver" for s in summaries):
        lines.append("\n## A multistep solver at fewer steps\n")
        lines += solver_lines(summaries, by_label.get("fvd"), scorer.spaces, cfg)
    lines.append(f"\n## Tuning (seed {TUNING_SEED})\n")
    lines += tuning_lines(outcome.tuning, cfg, scorer.spaces)
    lines.append("\n## Findings\n")
    lines += findings(by_label, summaries, primary)
    return "\n".join(lines) + "\n"


def reproduce_command(cfg: MnistBenchConfig, out_dir: Path) -> str:
    """The command line that reruns (or resumes) exactly this configuration."""
    preset = preset_name(cfg)
    tail = ((f" --eta {cfg.eta:g}" if cfg.eta != 1.0 else "")
            + f" --device {cfg.device} --workers {cfg.workers}" + (f" --batch-size {cfg.batch_size}" if cfg.batch_size else "")
            + ("" if cfg.store_images == (preset != "gpu") else " --images" if cfg.store_images else " --no-images"))
    if preset is not None:
        return f"fvd bench mnist --preset {preset}{tail} --out {out_dir}"
    ints = lambda values: ",".join(str(v) for v in values)
    parts = ["fvd bench mnist", f"--classes {ints(cfg.classes)}", f"--seeds {ints(cfg.seeds)}",
             f"--samples-per-cell {cfg.samples_per_cell}", f"--populations {cfg.min_populations}",
             f"--particles {cfg.n_particles}", f"--steps {cfg.num_steps}", f"--methods '{','.join(cfg.rows)}'",
             f"--svdd-candidates '{ints(cfg.svdd_candidates)}'", f"--dts-rollouts '{ints(cfg.dts_rollout_factors)}'",
             f"--scaling-steps '{ints(cfg.scaling_steps)}'"]
    if cfg.solver_steps:  # named only when set: commands of runs before the option stay as they were
        parts.append(f"--solver-steps {ints(cfg.solver_steps)}")
    if cfg.particle_sizes:
        parts.append(f"--particle-sizes {ints(cfg.particle_sizes)}")
    if cfg.tune:
        parts += [f"--families '{','.join(cfg.families)}'", f"--tuning-classes {ints(cfg.tuning_classes)}",
                  f"--grid-points {cfg.grid_points}", f"--tuning-samples {cfg.tuning_samples}"]
    else:
        parts.append("--no-tune")
    if cfg.feature_spaces:
        parts.append(f"--feature-spaces {','.join(cfg.feature_spaces)}")
    parts.append(f"--bootstrap {cfg.bootstrap}")
    return " ".join(parts) + tail + f" --out {out_dir}"
