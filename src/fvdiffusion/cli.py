"""The `fvd` command."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import List

import typer

app = typer.Typer(
    help="Inference-time reward alignment of diffusion models with particle populations "
         "(Fleming-Viot Diffusion and baselines).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
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
        _fail(str(exc))
    rows = run_toy_bench(cfg, out)
    (out / "table.md").write_text(toy_table(rows, cfg))
    figure = plot_toy(rows, out / "toy.png") if any(p.startswith("gmm2d") for p in cfg.problems) else None
    typer.echo(f"wrote {out / 'table.md'}" + (f" and {figure}" if figure else ""))


@app.command()
def suite(
    out: Path = typer.Option(Path("benchmarks/suite"), help="Directory for results.jsonl and table.md."),
    particles: int = typer.Option(1024, help="Particles N."),
    steps: int = typer.Option(50, help="Denoising steps K."),
    seeds: List[int] = typer.Option([1, 2, 3], "--seed", help="Reported seeds (repeat). Seed 0 is the tuning seed."),
    threads: int = typer.Option(1, help="torch threads (small tensors: 1 is fastest)."),
) -> None:
    """The declared tuning suite that picks FVD's defaults (seed 0), then every config on the reported seeds.

    Resumable: finished cells in OUT/results.jsonl are not rerun.
    """
    import torch

    from fvdiffusion.bench.tuning_suite import SuiteConfig, default_command, run_suite, suite_report

    torch.set_num_threads(threads)
    try:
        cfg = SuiteConfig(seeds=tuple(seeds), n_particles=particles, num_steps=steps)
    except ValueError as exc:
        _fail(str(exc))
    rows = run_suite(cfg, out)
    (out / "table.md").write_text(suite_report(rows, cfg, default_command(cfg, out)))
    typer.echo(f"wrote {out / 'table.md'}")


def _mount_optional_commands() -> None:
    """Commands that live next to what they drive register themselves here."""
    for module in ("fvdiffusion.train.commands", "fvdiffusion.bench.t2i", "fvdiffusion.bench.mnist_cli",
                   "fvdiffusion.sample_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


_mount_optional_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
