"""``fvd toy``: every method on the exact Gaussian-mixture toy at equal denoiser calls."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from fvdiffusion.cli.errors import fail


def toy(
    out: Path = typer.Option(Path("benchmarks/toy"), help="Directory for results.jsonl, table.md and toy.png."),
    problems: List[str] = typer.Option(
        ["gmm2d-component", "gmm8d-component", "gmm2d-linear", "gmm8d-linear"], "--problem",
        help="Toy problems to run (repeat the option). Names: gmm{2,8,16}d-{component,linear}."),
    seeds: List[int] = typer.Option([1, 2, 3], "--seed", help="Reported seeds (repeat). Seed 0 is the tuning seed."),
    particles: int = typer.Option(1024, help="Particles N (equal for every method: equal denoiser calls)."),
    steps: int = typer.Option(50, help="Denoising steps K."),
    tune: bool = typer.Option(True, help="Tune FVD and SMC knobs on seed 0 and add fvd-tuned / smc-tuned rows."),
    threads: int = typer.Option(1, help="torch threads (small tensors: 1 is fastest)."),
) -> None:
    """Every method on the exact Gaussian-mixture toy at equal denoiser calls; writes a table and a figure.

    Resumable: finished (problem, method, seed) cells in OUT/results.jsonl are not rerun.
    """
    import torch

    from fvdiffusion.bench.toy import ToyBenchConfig, run_toy_bench, toy_table
    from fvdiffusion.bench.toy_plots import plot_toy

    torch.set_num_threads(threads)
    try:
        cfg = ToyBenchConfig(problems=tuple(problems), seeds=tuple(seeds), n_particles=particles,
                             num_steps=steps, tune=tune)
    except ValueError as exc:
        fail(str(exc))
    rows = run_toy_bench(cfg, out)
    (out / "table.md").write_text(toy_table(rows, cfg))
    figure = plot_toy(rows, out / "toy.png") if any(p.startswith("gmm2d") for p in cfg.problems) else None
    typer.echo(f"wrote {out / 'table.md'}" + (f" and {figure}" if figure else ""))


def register(app: typer.Typer) -> None:
    app.command("toy")(toy)
