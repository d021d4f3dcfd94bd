"""``fvd toy``: every method on the exact Gaussian-mixture toy at equal denoiser calls."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from fvdiffusion.cli.errors import check_fits, check_out, check_range, handles_errors, set_threads, threads_option

# working set per particle and dimension, float64, with the samplers' copies (state, x0, eps,
# noise, candidates, lineage, metrics): a deliberately generous bound
TOY_BYTES_PER_PARTICLE_DIM = 8 * 64


def check_toy_sizes(particles: int, steps: int, seeds: List[int], problems: List[str]) -> None:
    """Seeds, steps and particles of a toy-problem command, checked before any compute."""
    from fvdiffusion.schedule import VPSchedule
    from fvdiffusion.testbeds import toy_problem

    from fvdiffusion.config import SEED_MAX

    for seed in seeds:
        check_range("--seed", seed, 0, SEED_MAX)
    check_range("--particles", particles, 2)
    check_range("--steps", steps, 1, VPSchedule.linear(1000).num_train_timesteps,
                "the toy schedule has 1000 training steps")
    dim = max(toy_problem(name).dim for name in problems)  # an unknown name raises with the valid ones
    check_fits("--particles", particles, dim * TOY_BYTES_PER_PARTICLE_DIM)


@handles_errors
def toy(
    out: Path = typer.Option(Path("benchmarks/toy"), help="Directory for results.jsonl, table.md and toy.png."),
    problems: List[str] = typer.Option(
        ["gmm2d-component", "gmm8d-component", "gmm2d-linear", "gmm8d-linear"], "--problem",
        help="Toy problems to run (repeat the option). Names: gmm{2,8,16}d-{component,linear}."),
    seeds: List[int] = typer.Option([1, 2, 3], "--seed", help="Reported seeds (repeat). Seed 0 is the tuning seed."),
    particles: int = typer.Option(1024, help="Particles N (equal for every method: equal denoiser calls)."),
    steps: int = typer.Option(50, help="Denoising steps K (at most the schedule's 1000 training steps)."),
    tune: bool = typer.Option(True, help="Tune FVD and SMC knobs on seed 0 and add fvd-tuned / smc-tuned rows."),
    threads: int = threads_option(),
) -> None:
    """Every method on the exact Gaussian-mixture toy at equal denoiser calls; writes a table and a figure.

    Resumable: finished (problem, method, seed) cells in OUT/results.jsonl are not rerun.
    """
    set_threads(threads)
    check_out(out)
    check_toy_sizes(particles, steps, seeds, problems)

    import fvdiffusion as fv
    from fvdiffusion.bench.toy.config import ToyBenchConfig
    from fvdiffusion.bench.toy.plots import plot_toy
    from fvdiffusion.bench.toy.report import toy_table
    from fvdiffusion.bench.toy.run import run_toy_bench

    cfg = ToyBenchConfig(problems=tuple(problems), seeds=tuple(seeds), n_particles=particles,
                         num_steps=steps, tune=tune)
    # every cell's config is valid before the first cell runs (tuning runs seed 0 first)
    for spec in cfg.methods:
        for seed in (0, *cfg.seeds):
            fv.make_config(spec.method, n_particles=particles, num_steps=steps, seed=seed, **spec.options)
    rows = run_toy_bench(cfg, out)
    from fvdiffusion.durable import write_atomically

    write_atomically(out / "table.md", toy_table(rows, cfg).encode("utf-8"))
    figure = plot_toy(rows, out / "toy.png") if any(p.startswith("gmm2d") for p in cfg.problems) else None
    typer.echo(f"wrote {out / 'table.md'}" + (f" and {figure}" if figure else ""))


def register(app: typer.Typer) -> None:
    app.command("toy")(toy)
