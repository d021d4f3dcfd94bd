"""The toy benchmark's tables: one per problem, what the value-based methods need to match FVD, and a
multistep solver at fewer steps against K-step DDIM."""

from __future__ import annotations

import math
from typing import Any

from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.common.stats import fmt_pm, markdown_table, mean_std
from fvdiffusion.bench.toy.config import SOLVER_REFERENCES, VALUE_BASED_SWEEPS, ToyBenchConfig

# the law each method samples exactly, and the row fields that hold its error (run.data_law_error)
SOLVER_LAWS = {"base": ("p (data)", "data_"), "fvd": ("π* (target)", "")}


def toy_table(rows: list[dict[str, Any]], cfg: ToyBenchConfig) -> str:
    """One Markdown table per problem; rows in benchmark order, ± is the std over seeds."""
    out = [f"N = {cfg.n_particles} particles, {cfg.num_steps} steps, seeds {list(cfg.seeds)} "
           f"(tuning seed {TUNING_SEED} not reported). SW2 = sliced Wasserstein-2 to 8192 exact target "
           "samples; floor = the same for an exact sample set of size N; distinct = distinct final "
           "samples (copies counted once); K/2 anc. = distinct step-K/2 ancestors among them.\n"]
    header = ["method", "SW2", "SW2 / floor", "mass on target", "mean err", "cov err", "reward", "distinct", "K/2 anc.",
              "denoiser calls", "wall s", "note"]
    solver_only = {s.label for s in cfg.solver_only}
    for problem in cfg.problems:
        prows = [r for r in rows if r["problem"] == problem and r["label"] not in solver_only]
        labels = list(dict.fromkeys(r["label"] for r in prows))
        table = []
        for label in labels:
            cell = [r for r in prows if r["label"] == label]
            mass = [r["mass_on_target"] for r in cell if r["mass_on_target"] is not None]
            table.append([
                label, fmt_pm([r["sliced_w2"] for r in cell]), fmt_pm([r["floor_ratio"] for r in cell], 2),
                fmt_pm(mass, 3) if mass else "–", fmt_pm([r["mean_error"] for r in cell]),
                fmt_pm([r["cov_error"] for r in cell], 2), fmt_pm([r["reward_mean"] for r in cell], 2),
                fmt_pm([r.get("distinct_samples", float("nan")) for r in cell], 0),
                fmt_pm([r.get("distinct_midpoint_ancestors", float("nan")) for r in cell], 0), cell[0]["denoiser_calls"],
                f"{mean_std([r['wall_seconds'] for r in cell])[0]:.2f}", cell[0].get("note", ""),
            ])
        floor = mean_std([r["exact_floor"] for r in prows])[0]
        out.append(f"\n### {problem}\n\nexact-sample floor SW2 = {floor:.4f}\n\n" + markdown_table(header, table)
                   + budget_table(rows, problem))
    return "".join(out) + solver_table(rows, cfg)


def budget_to_match(rows: list[dict[str, Any]], problem: str, family: str, reference: str = "fvd") -> list[Any]:
    """Smallest swept budget at which ``family`` reaches the reference method's mean SW2."""
    ref = [r for r in rows if r["problem"] == problem and r["label"] == reference]
    if not ref:
        return [family, "–", "–", "–", "–"]
    ref_sw2 = mean_std([r["sliced_w2"] for r in ref])[0]
    ref_calls = ref[0]["denoiser_calls"]
    ref_wall = mean_std([r["wall_seconds"] for r in ref])[0]
    best = None
    for spec in VALUE_BASED_SWEEPS[family]:
        cell = [r for r in rows if r["problem"] == problem and r["label"] == spec.label]
        if not cell:
            continue
        sw2 = mean_std([r["sliced_w2"] for r in cell])[0]
        calls = mean_std([r["denoiser_calls"] for r in cell])[0]
        wall = mean_std([r["wall_seconds"] for r in cell])[0]
        if best is None or sw2 < best[1]:
            best = (spec.label, sw2, calls)
        if sw2 <= ref_sw2:
            return [family, f"{calls:,.0f} ({spec.label})", f"{calls / ref_calls:.1f}×", f"{sw2:.3f}",
                    f"{wall / ref_wall:.1f}×"]
    if best is None:
        return [family, "–", "–", "–", "–"]
    return [family, f"not reached (best {best[0]}: {best[2]:,.0f} calls)", "–", f"{best[1]:.3f}", "–"]


def budget_table(rows: list[dict[str, Any]], problem: str) -> str:
    ref = [r for r in rows if r["problem"] == problem and r["label"] == "fvd"]
    if not ref:
        return ""
    ref_sw2 = mean_std([r["sliced_w2"] for r in ref])[0]
    header = ["value-based method", "denoiser calls to reach FVD's SW2", "× FVD's calls", "SW2 there",
              "wall time × FVD's"]
    table = [budget_to_match(rows, problem, family) for family in VALUE_BASED_SWEEPS]
    return (f"\nFVD: SW2 {ref_sw2:.3f} with {ref[0]['denoiser_calls']:,} denoiser calls. "
            "Budgets swept: svdd M ∈ {2, 4, 8, 16} candidates, dts rollouts ∈ {256, 1024, 4096, 16384}.\n\n"
            + markdown_table(header, table))


def solver_table(rows: list[dict[str, Any]], cfg: ToyBenchConfig) -> str:
    """Each solver-table row against its method's K-step DDIM row: exact-law error and denoiser calls."""
    if not cfg.solver_methods:
        return ""
    header = ["problem", "method", "sampler", "exact law", "SW2", "SW2 / floor", "denoiser calls", "SW2 vs DDIM K",
              "calls saved"]
    table = []
    for problem in cfg.problems:
        for spec in cfg.solver_methods:
            cell = [r for r in rows if r["problem"] == problem and r["label"] == spec.label]
            reference = [r for r in rows if r["problem"] == problem and r["label"] == SOLVER_REFERENCES[spec.method]]
            if cell:
                law, prefix = SOLVER_LAWS[spec.method]
                table.append([problem, spec.label, _sampler(spec.options, cfg.num_steps), law,
                              _fmt_field(cell, prefix + "sliced_w2", 3), _fmt_field(cell, prefix + "floor_ratio", 2),
                              f"{cell[0]['denoiser_calls']:,}", *_against(cell, reference, prefix + "sliced_w2")])
    return (f"\n## A multistep solver at fewer steps\n\nbase and FVD (its defaults) on deterministic samplers: "
            f"DDIM on the benchmark's K = {cfg.num_steps} steps (the reference), DDIM on fewer steps (the control: "
            "what fewer steps cost without a better solver) and DPM-Solver++(2M) on as few. Each method is measured "
            "against the law it samples exactly: base the data law p, FVD the target π* (SW2 to 8192 exact draws; "
            "floor: the same for an exact set of size N). SW2 vs DDIM K: change of the mean SW2 against the same "
            "method's K-step DDIM row; calls saved: fewer denoiser calls than it. ± is the std over seeds.\n\n"
            + markdown_table(header, table))



def _sampler(options: dict[str, Any], num_steps: int) -> str:
    name = "DPM-Solver++(2M)" if options.get("transition") == "dpmpp_2m" else "DDIM"
    return f"{name}, K = {options.get('num_steps', num_steps)}"


def _fmt_field(cell: list[dict[str, Any]], field: str, digits: int) -> str:
    """mean ± std of ``field`` over seeds; "–" for rows written before the field existed."""
    return fmt_pm([r.get(field, float("nan")) for r in cell], digits)


def _against(cell: list[dict[str, Any]], reference: list[dict[str, Any]], field: str) -> list[str]:
    """[SW2 change %, calls saved %] of a row against its reference row ("–" without one)."""
    if not reference:
        return ["–", "–"]
    sw2 = mean_std([r.get(field, float("nan")) for r in cell])[0]
    ref_sw2 = mean_std([r.get(field, float("nan")) for r in reference])[0]
    change = "–" if math.isnan(sw2) or math.isnan(ref_sw2) else f"{100 * (sw2 / ref_sw2 - 1):+.0f}%"
    return [change, f"{100 * (1 - cell[0]['denoiser_calls'] / reference[0]['denoiser_calls']):.0f}%"]
