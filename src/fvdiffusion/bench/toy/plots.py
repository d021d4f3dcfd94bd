"""The toy benchmark's figure: samples over the exact target density, and genealogy curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fvdiffusion.bench.common.images import save_figure
from fvdiffusion.testbeds import toy_problem

SCATTER_LABELS = ("base", "smc-multinomial", "smc-tuned", "vasr", "fvd", "fvd-tuned", "svdd-M8", "dts-R4096",
                  "ddim:smc-multinomial", "ddim:fvd-nu0", "ddim:fvd", "fvd-nu1")
LINEAGE_LABELS = ("smc-multinomial", "smc-ess0.5", "fvd", "fvd-weighted", "ddim:smc-multinomial", "ddim:fvd")


def _density_grid(problem_name: str, lim: float = 2.6, n: int = 200):
    problem = toy_problem(problem_name)
    xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    target = problem.target.log_prob(pts).exp().reshape(n, n)
    data = problem.mixture.log_prob(pts).exp().reshape(n, n)
    return gx.numpy(), gy.numpy(), target.numpy(), data.numpy()


def plot_toy(rows: list[dict[str, Any]], path: Path, scatter_problem: str = "gmm2d-component",
             lineage_problems: tuple[str, ...] = ("gmm2d-component", "gmm8d-component")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_samples = {r["label"]: r for r in rows if r["problem"] == scatter_problem and "samples" in r}
    labels = [lab for lab in SCATTER_LABELS if lab in with_samples]
    ncols = 5
    nrows_scatter = (len(labels) + ncols - 1) // ncols
    fig = plt.figure(figsize=(4 * ncols, 4 * nrows_scatter + 4.2))
    grid = fig.add_gridspec(nrows_scatter + 1, ncols, height_ratios=[1] * nrows_scatter + [1.05])
    gx, gy, target, data = _density_grid(scatter_problem)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        ax.contour(gx, gy, data, levels=6, colors="0.75", linewidths=0.6)
        ax.contourf(gx, gy, target, levels=12, cmap="Greens", alpha=0.6)
        pts = torch.tensor(with_samples[label]["samples"])
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="crimson", alpha=0.5, linewidths=0)
        r = with_samples[label]
        ax.set_title(f"{label}\nSW2 {r['sliced_w2']:.3f}  distinct {r.get('distinct_samples', '?')}"
                     f"  K/2 anc. {r.get('distinct_midpoint_ancestors', '?')}", fontsize=9)
        ax.set_xlim(gx.min(), gx.max()), ax.set_ylim(gy.min(), gy.max())
        ax.set_xticks([]), ax.set_yticks([])
    lineage_problems = tuple(p for p in lineage_problems if any(r["problem"] == p for r in rows))
    for j, problem in enumerate(lineage_problems):
        ax = fig.add_subplot(grid[nrows_scatter, j * ncols // 2: (j + 1) * ncols // 2])
        for label in LINEAGE_LABELS:
            curves = [r["genealogy"] for r in rows if r["problem"] == problem and r["label"] == label]
            if not curves:
                continue
            mean = torch.tensor(curves, dtype=torch.float64).mean(0)
            k = torch.arange(len(mean), 0, -1)
            ax.plot(k, mean, label=label, ls="--" if label.startswith("ddim") else "-")
        ax.set_yscale("log"), ax.invert_xaxis()
        ax.set_xlabel("denoising step k (K → 1)"), ax.set_ylabel("distinct step-k ancestors of the N final slots\n(copies count: see distinct above)", fontsize=8)
        ax.set_title(f"genealogy, {problem} (mean over seeds)", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{scatter_problem}: samples (red) over the exact target density (green); grey = data density",
                 fontsize=11)
    return save_figure(fig, path, dpi=90)
