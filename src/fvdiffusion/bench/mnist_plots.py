"""The MNIST benchmark's figures: compute scaling, genealogy curves, sample grids."""

from __future__ import annotations

from pathlib import Path

from fvdiffusion.bench.images import save_rows
from fvdiffusion.bench.mnist import REAL_LABEL, BenchOutcome, LabelSummary, images_from_u8

LINEAGE_LABELS = ("smc-multinomial", "smc-systematic", "smc-tuned", "vasr", "fvd", "fvd-tuned", "fvd-nu1",
                  "fvd-weighted", "fvd-ctrl")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_compute_scaling(summaries: list[LabelSummary], path: Path) -> Path:
    """FID against denoiser calls per sample: one curve per family (budget or step sweeps), points otherwise."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    families: dict[str, list[LabelSummary]] = {}
    for s in summaries:
        if s.label != REAL_LABEL and s.same_as is None:
            families.setdefault(s.family, []).append(s)
    markers = "osD^v<>pXh*P"
    for i, (family, members) in enumerate(families.items()):
        members = sorted(members, key=lambda s: s.calls_per_sample)
        xs, ys = [s.calls_per_sample for s in members], [s.fid for s in members]
        style = "-" if len(members) > 1 else ""
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], label=family, ms=6)
        if len(members) > 1:
            for s in members:
                ax.annotate(str(s.budget if s.budget is not None else ""), (s.calls_per_sample, s.fid), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    real = next((s for s in summaries if s.label == REAL_LABEL), None)
    if real is not None:
        ax.axhline(real.fid, color="0.4", ls="--", lw=1, label="real digits (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("denoiser calls per returned sample (log)")
    ax.set_ylabel("FID to held-out class-c digits (mean over classes, seeds)")
    ax.set_title("Compute scaling: svdd labelled by M, dts by rollouts, step sweeps by K", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_lineages(summaries: list[LabelSummary], path: Path, labels: tuple[str, ...] = LINEAGE_LABELS) -> Path:
    """Distinct step-k ancestors of the final population, k = K … 1 (mean over cells and populations)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        if s.label not in labels or not s.genealogy:
            continue
        k = list(range(len(s.genealogy), 0, -1))
        ax.plot(k, s.genealogy, label=s.label, ls="-" if s.family.startswith("fvd") else "--")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("denoising step k (K → 1)")
    ax.set_ylabel("distinct step-k ancestors of the final population")
    ax.set_title("Genealogy: SMC (dashed) against FVD (solid)", fontsize=10)
    ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_sample_grid(outcome: BenchOutcome, summaries: list[LabelSummary], path: Path) -> Path | None:
    """One row of stored samples per method (the grid class and seed of the run)."""
    stored = {r["label"]: r for r in outcome.rows if r.get("samples_u8")}
    order = [s.label for s in summaries if s.label in stored and s.group != "scaling"]
    if not order:
        return None
    rows = [(f"{label}\nFID {stored[label]['fid']:.1f}", images_from_u8(stored[label]["samples_u8"])) for label in order]
    return save_rows(rows, Path(path), per_row=max(len(stored[label]["samples_u8"]) for label in order))


def write_figures(outcome: BenchOutcome, summaries: list[LabelSummary], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [plot_compute_scaling(summaries, out_dir / "fid_vs_calls.png"),
             plot_lineages(summaries, out_dir / "lineages.png")]
    stored = [r for r in outcome.rows if r.get("samples_u8")]
    if stored:
        grid = plot_sample_grid(outcome, summaries, out_dir / f"samples_class{stored[0]['class']}.png")
        if grid is not None:
            paths.append(grid)
    return paths
