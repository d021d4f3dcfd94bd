"""results.md of the ground-truth benchmark: the SNIS reference per sampler type, then each
method's standardised error against it."""

from __future__ import annotations

from dataclasses import dataclass

from fvdiffusion.bench.common.stats import markdown_table
from fvdiffusion.bench.truth.config import MIN_ESS, MIN_SHIFT
from fvdiffusion.bench.truth.outcome import SamplerOutcome
from fvdiffusion.bench.truth.scoring import REFERENCE_LABEL


@dataclass(frozen=True)
class Commands:
    """The exact commands that produced (or will produce) each stage, shown at the top."""

    reference: str
    compare: str


def truth_report(outcomes: list[SamplerOutcome], commands: Commands, testbed_name: str, threads: int,
                 bootstrap: int) -> str:
    first = outcomes[0]
    lam, steps = first.compare_cfg.lam, first.reference_cfg.steps
    lines = [
        f"# Ground truth on {testbed_name}: every method against the exact tilt of the same {steps}-step sampler",
        "", "```", commands.reference, commands.compare, "```", "",
        f"Target: π_K(x0) ∝ p_K(x0) · exp(λ r(x0)), p_K the law of the {steps}-step sampler itself (the "
        f"\"sampler floor\": the best any steering of it can reach), λ = {lam:g}, reward "
        f"r = `{first.reward_statistic}`. K = {steps}: the reference costs (base samples × K) denoiser rows per "
        f"sampler type, and K = 20 rather than 50 keeps 20,000 of them affordable on a CPU. The reference is self-normalised importance sampling of base samples "
        f"(`fvdiffusion.sample(\"base\", ...)` in shards with seeds 1,000,000 + shard), weights exp(λ r(x0)); its "
        f"standard errors come from the delta method and from {bootstrap:,} "
        f"bootstrap resamples of the base samples. Torch threads: {threads}.", "",
        "Statistics of x0 (all cheap, deterministic): " + ", ".join(f"`{n}`" for n in first.base.names) +
        " (definitions: `fvdiffusion/bench/truth/statistics.py`).", "",
    ]
    for o in outcomes:
        lines += _reference_section(o)
    for o in outcomes:
        lines += _compare_section(o)
    return "\n".join(lines) + "\n"


def _reference_section(o: SamplerOutcome) -> list[str]:
    cfg = o.reference_cfg
    head = [f"## Reference (sampler floor), {o.sampler} (η = {cfg.eta:g})", ""]
    done = (f"{o.base.n:,} of {cfg.base_samples:,} base samples ({o.base.shards_done} of {o.base.shards_total} "
            f"shards of {cfg.shard_size}; {o.base.wall_seconds / 60:.1f} min of sampling).")
    if o.reference is None:
        return head + [f"No reference yet: {done}", ""]
    m = o.reference.moments
    status = [done if o.base.complete else f"**INCOMPLETE**: {done} Every number below is provisional.", "",
              f"- SNIS effective sample size: **{m.ess:,.0f}** of {m.n:,} "
              f"(required >= {MIN_ESS:,}: {'met' if o.ess_met else 'NOT met'}).",
              f"- The tilt moves the reward mean by **{o.reward_shift:.2f}** base standard deviations "
              f"(required >= {MIN_SHIFT}: {'met' if o.shift_met else 'NOT met'}).", ""]
    se_boot = o.reference.bootstrap_se
    shift = m.shift()
    body = [[name, _g(m.base_mean[j]), _g(m.base_std[j]), _g(m.mean[j]), _g(m.se[j]), _g(se_boot[j]), _g(m.std[j]),
             f"{float(shift[j]):+.3f}"] for j, name in enumerate(m.names)]
    table = markdown_table(["statistic", "base mean", "base std", "tilted mean", "SE (delta)", "SE (bootstrap)",
                            "tilted std", "shift / base std"], body)
    return head + status + [table]


def _compare_section(o: SamplerOutcome) -> list[str]:
    cfg = o.compare_cfg
    head = [f"## Methods against the reference, {o.sampler} (η = {cfg.eta:g})", ""]
    if not o.rows:
        return head + ["No populations yet (`--stage compare`).", ""]
    if o.scores is None:
        return head + [f"{len(o.rows)} populations, but no reference to score them against yet.", ""]
    seeds = sorted({row["seed"] for row in o.rows})
    names = o.base.names
    notes = [f"N = {cfg.n_particles}, K = {cfg.steps}, λ = {cfg.lam:g}; populations on reported seeds "
             f"{_seed_text(seeds)} (seed 0, the tuning seed, is never run). Error = (method mean − reference mean) "
             f"/ base std per statistic; the method mean averages its populations' weighted means. [95% interval] "
             f"from bootstrap draws of the populations and of the base samples together; a statistic is "
             f"*flagged* when its interval excludes 0. RMS over the {len(names)} statistics; *noise RMS* is what "
             f"an exactly unbiased method would show with this many populations and this reference.", ""]
    if not o.base.complete:
        notes += [f"**PROVISIONAL**: the reference holds {o.base.n:,} of {o.reference_cfg.base_samples:,} base samples.",
                  ""]
    reward = o.reward_statistic
    summary = []
    for s in o.scores:
        is_ref = s.label == REFERENCE_LABEL
        summary.append([s.label, "–" if is_ref else s.populations, s.errors[reward].format(3),
                        "–" if is_ref else s.rms.format(3), f"{s.noise_rms:.3f}",
                        "–" if is_ref else f"{len(s.flagged)} / {len(names)}",
                        "–" if s.distinct_samples is None else f"{s.distinct_samples:.1f}",
                        "–" if s.denoiser_calls is None else f"{s.denoiser_calls:,.0f}",
                        "–" if s.wall_seconds is None else f"{s.wall_seconds:.1f}"])
    table = markdown_table(["method", "populations", f"error in {reward} [95%]", "RMS error [95%]", "noise RMS",
                            "flagged", "distinct samples", "denoiser calls", "s / population"], summary)
    per_stat = [[s.label, *[_flag(s.errors[n].estimate, n in s.flagged) for n in names]]
                for s in o.scores if s.label != REFERENCE_LABEL]
    detail = markdown_table(["method", *names], per_stat)
    return head + notes + [table, "Standardised error per statistic (* = interval excludes 0):", "", detail]


def _flag(value: float, flagged: bool) -> str:
    return f"{value:+.3f}" + ("*" if flagged else "")


def _g(value) -> str:
    return f"{float(value):.5g}"


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))
