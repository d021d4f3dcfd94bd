"""The MNIST benchmark's figures: compute scaling, genealogy curves, sample grids."""

from __future__ import annotations

from pathlib import Path

from fvdiffusion.bench.images import grid, save_figure
from fvdiffusion.bench.mnist import REAL_LABEL, BenchOutcome, LabelSummary, decode_images

LINEAGE_LABELS = ("smc-multinomial", "smc-systematic", "smc-tuned", "vasr", "fvd", "fvd-tuned", "fvd-nu1",
                  "fvd-weighted", "fvd-ctrl")


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


def plot_compute_scaling(summaries: list[LabelSummary], path: Path) -> Path:
    """FID against denoiser calls per sample: one curve per family (budget or step sweeps), points otherwise."""
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
        xs, ys = [s.calls_per_sample for s in members], [s.fid for s in members]
        style = "-" if len(members) > 1 else ""
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], color=colours[i % len(colours)],
                label=family, ms=6)
        if len(members) > 1:
            prefix = {"svdd": "M=", "dts": "R="}.get(family, "K=")
            for s in members:
                ax.annotate(f"{prefix}{s.budget}", (s.calls_per_sample, s.fid), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    real = next((s for s in summaries if s.label == REAL_LABEL), None)
    if real is not None:
        ax.axhline(real.fid, color="0.4", ls="--", lw=1, label="real digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # FIDs span two orders of magnitude (base vs the steered methods)
    _readable_log_ticks(ax.xaxis)
    _readable_log_ticks(ax.yaxis)
    ax.set_xlabel("denoiser calls per returned sample (log)")
    ax.set_ylabel("FID to held-out class-c digits (log; mean over classes, seeds)")
    ax.set_title("Compute scaling: K = steps, M = svdd candidates, R = dts rollouts", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = save_figure(fig, path)
    return out


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
    ax.set_ylabel("distinct step-k ancestors of the final population")
    ax.set_title("Genealogy: SMC and VASR (dashed) against FVD (solid); mean over cells and populations",
                 fontsize=10)
    ax.legend(fontsize=7)
    out = save_figure(fig, path)
    return out


def plot_sample_grid(outcome: BenchOutcome, summaries: list[LabelSummary], path: Path) -> Path | None:
    """One row of stored samples per method (the first class and seed of the run), FID in the label."""
    stored = {r["label"]: r for r in outcome.rows if r.get("samples_b64")}
    order = [s.label for s in summaries if s.label in stored and s.group != "scaling" and s.same_as is None]
    if not order:
        return None
    plt = _pyplot()
    images = {label: decode_images(stored[label]["samples_b64"]) for label in order}
    per_row = max(x.shape[0] for x in images.values())
    fig, axes = plt.subplots(len(order), 1, figsize=(per_row * 0.55 + 2.4, 0.72 * len(order) + 0.5), squeeze=False)
    for ax, label in zip(axes[:, 0], order):
        tiles = grid(images[label], ncols=per_row)
        ax.imshow(tiles.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"{label}\nFID {stored[label]['fid']:.1f}", rotation=0, ha="right", va="center", fontsize=8)
    row = stored[order[0]]
    fig.suptitle(f"class {row['class']}, seed {row['seed']}: first samples of each method", fontsize=9)
    out = save_figure(fig, path, dpi=80)  # one pixel per image pixel is enough
    return out


def write_figures(outcome: BenchOutcome, summaries: list[LabelSummary], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [plot_compute_scaling(summaries, out_dir / "fid_vs_calls.png"),
             plot_lineages(summaries, out_dir / "lineages.png")]
    stored = [r for r in outcome.rows if r.get("samples_b64")]
    if stored:
        grid = plot_sample_grid(outcome, summaries, out_dir / f"samples_class{stored[0]['class']}.png")
        if grid is not None:
            paths.append(grid)
    return paths
