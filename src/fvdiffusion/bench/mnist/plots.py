"""The MNIST benchmark's figures: compute scaling (with interval bars), genealogy curves, sample grids."""

from __future__ import annotations

from pathlib import Path

from fvdiffusion.bench.common.images import grid, save_figure
from fvdiffusion.bench.mnist.cells import PREVIEW_IMAGES, decode_images
from fvdiffusion.bench.mnist.methods import REAL_LABEL
from fvdiffusion.bench.mnist.report import LabelSummary
from fvdiffusion.bench.mnist.run import BenchOutcome

LINEAGE_LABELS = ("smc-multinomial", "smc-fk", "smc-ess", "smc-systematic", "smc-tuned", "smc-fk-tuned",
                  "smc-ess-tuned", "vasr", "vasr-tuned", "fvd", "fvd-tuned", "fvd-nu1", "fvd-weighted", "fvd-ctrl")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _readable_log_ticks(axis) -> None:
    """Plain numbers at 1, 2, 5 × 10^k on a log axis (the default shows only powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_compute_scaling(summaries: list[LabelSummary], space: str, path: Path) -> Path:
    """FID against denoiser calls per sample: one curve per family (budget or step sweeps), points otherwise,
    with the 95% population-bootstrap interval as an error bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    families: dict[str, list[LabelSummary]] = {}
    for s in summaries:
        if s.label != REAL_LABEL and s.same_as is None:
            families.setdefault(s.family, []).append(s)
    markers = "osD^v<>pXh*P"
    # more families than the default cycle's 10 colours
    colours = list(plt.get_cmap("tab10").colors) + ["black", "darkgoldenrod", "teal", "navy"]
    for i, (family, members) in enumerate(families.items()):
        members = sorted(members, key=lambda s: s.calls_per_sample)
        xs, ys = [s.calls_per_sample for s in members], [s.fid[space].estimate for s in members]
        # a re-centred percentile interval can sit wholly above or below its estimate: clip the bars at it
        errors = [[max(0.0, y - s.fid[space].low) for y, s in zip(ys, members)],
                  [max(0.0, s.fid[space].high - y) for y, s in zip(ys, members)]]
        ax.errorbar(xs, ys, yerr=errors, fmt="-" if len(members) > 1 else "", marker=markers[i % len(markers)],
                    color=colours[i % len(colours)], label=family, ms=6, capsize=2)
        if len(members) > 1:
            prefix = {"svdd": "M=", "dts": "R="}.get(family, "K=")
            for s in members:
                ax.annotate(f"{prefix}{s.budget}", (s.calls_per_sample, s.fid[space].estimate), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    real = next((s for s in summaries if s.label == REAL_LABEL), None)
    if real is not None:
        ax.axhline(real.fid[space].estimate, color="0.4", ls="--", lw=1, label="real digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # FIDs span two orders of magnitude (base vs the steered methods)
    _readable_log_ticks(ax.xaxis)
    _readable_log_ticks(ax.yaxis)
    ax.set_xlabel("denoiser calls per returned sample (log)")
    ax.set_ylabel(f"FID ({space} space) to held-out class-c digits (log; mean over cells)")
    ax.set_title("Compute scaling: K = steps, M = svdd candidates, R = dts rollouts", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = save_figure(fig, path)
    return out


def plot_quality_against_wall(summaries: list[LabelSummary], space: str, path: Path) -> Path | None:
    """FID against wall seconds per population (reward calls included) as N grows: one curve per
    method of the particle sweep (group "wall"), N annotated, 95% interval bars. None without a sweep."""
    sweep: dict[str, list[LabelSummary]] = {}
    for s in summaries:
        if s.group == "wall":
            sweep.setdefault(s.family, []).append(s)
    if not sweep:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (family, members) in enumerate(sweep.items()):
        members = sorted(members, key=lambda s: s.budget or 0)
        xs, ys = [s.wall_per_population for s in members], [s.fid[space].estimate for s in members]
        errors = [[max(0.0, y - s.fid[space].low) for y, s in zip(ys, members)],
                  [max(0.0, s.fid[space].high - y) for y, s in zip(ys, members)]]
        ax.errorbar(xs, ys, yerr=errors, fmt="-", marker="osD^v<>"[i % 7], label=family, ms=6, capsize=2)
        for s in members:
            ax.annotate(f"N={s.budget}", (s.wall_per_population, s.fid[space].estimate), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _readable_log_ticks(ax.xaxis)
    _readable_log_ticks(ax.yaxis)
    ax.set_xlabel("wall seconds per population (denoiser and reward calls; log)")
    ax.set_ylabel(f"FID ({space} space; log; mean over cells)")
    ax.set_title("Quality against wall time as the population grows", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lineages(summaries: list[LabelSummary], path: Path, labels: tuple[str, ...] = LINEAGE_LABELS) -> Path:
    """Distinct step-k ancestors of the final population, k = K … 1 (mean over cells and populations)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    twins: dict[str, list[str]] = {}
    for s in summaries:
        if s.same_as is not None:
            twins.setdefault(s.same_as, []).append(s.label)
    for s in summaries:
        if s.label not in labels or not s.genealogy or s.same_as is not None:
            continue  # a row identical to an earlier one is named in that row's legend entry
        k = list(range(len(s.genealogy), 0, -1))
        name = " = ".join([s.label, *twins.get(s.label, [])])
        ax.plot(k, s.genealogy, label=name, ls="-" if s.family.startswith("fvd") else "--")
    ax.set_yscale("log")
    _readable_log_ticks(ax.yaxis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_xaxis()
    ax.set_xlabel("denoising step k (K → 1)")
    ax.set_ylabel("distinct step-k ancestors of the N final slots (copies count)")
    ax.set_title("Genealogy: SMC and VASR (dashed) against FVD (solid); mean over cells and populations",
                 fontsize=10)
    ax.legend(fontsize=7)
    out = save_figure(fig, path)
    return out


def plot_sample_grid(outcome: BenchOutcome, summaries: list[LabelSummary], space: str, path: Path,
                     per_row: int = PREVIEW_IMAGES) -> Path | None:
    """The preview samples of each method's first population (first class and seed of the run), FID in the label."""
    previewed = [r for r in outcome.rows if "preview" in r]  # rows written before previews existed have none
    if not previewed:
        return None
    cls, seed = previewed[0]["class"], previewed[0]["seed"]
    stored = {r["label"]: r for r in previewed if (r["class"], r["seed"]) == (cls, seed)}
    order = [s for s in summaries if s.label in stored and s.group != "scaling" and s.same_as is None]
    if not order:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(order), 1, figsize=(per_row * 0.55 + 2.4, 0.72 * len(order) + 0.5), squeeze=False)
    for ax, s in zip(axes[:, 0], order):
        images = decode_images(stored[s.label]["preview"])[:per_row]
        ax.imshow(grid(images, ncols=per_row).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"{s.label}\nFID {s.fid[space].estimate:.1f}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"class {cls}, seed {seed}: first samples of each method's first population "
                 f"(FID: {space} space, mean over cells)", fontsize=9)
    return save_figure(fig, path, dpi=80)  # one pixel per image pixel is enough


def write_figures(outcome: BenchOutcome, summaries: list[LabelSummary], space: str, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [plot_compute_scaling(summaries, space, out_dir / "fid_vs_calls.png"),
             plot_lineages(summaries, out_dir / "lineages.png")]
    wall = plot_quality_against_wall(summaries, space, out_dir / "fid_vs_wall.png")
    if wall is not None:
        paths.append(wall)
    if outcome.rows:
        sample_grid = plot_sample_grid(outcome, summaries, space, out_dir / f"samples_class{outcome.rows[0]['class']}.png")
        if sample_grid is not None:
            paths.append(sample_grid)
    return paths
