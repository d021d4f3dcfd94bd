"""``fvd suite``: the declared tuning suite that picks FVD's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from fvdiffusion.cli.errors import check_out, handles_errors, set_threads, threads_option
from fvdiffusion.cli.toy import check_toy_sizes


@handles_errors
def suite(
    out: Path = typer.Option(Path("benchmarks/suite"), help="Directory for results.jsonl and table.md."),
    particles: int = typer.Option(1024, help="Particles N."),
    steps: int = typer.Option(50, help="Denoising steps K (at most the schedule's 1000 training steps)."),
    seeds: List[int] = typer.Option([1, 2, 3], "--seed", help="Reported seeds (repeat). Seed 0 is the tuning seed."),
    threads: int = threads_option(),
) -> None:
    """The declared tuning suite that picks FVD's defaults (seed 0), then every config on the reported seeds.

    Resumable: finished cells in OUT/results.jsonl are not rerun.
    """
    set_threads(threads)
    check_out(out)

    import fvdiffusion as fv
    from fvdiffusion.bench.toy.suite import (
        SAMPLERS, SuiteConfig, default_command, entries, run_suite, suite_report,
    )

    cfg = SuiteConfig(seeds=tuple(seeds), n_particles=particles, num_steps=steps)
    check_toy_sizes(particles, steps, list(cfg.seeds), list(cfg.problems))
    for entry in entries():  # every cell's config is valid before the first cell runs
        for eta in SAMPLERS.values():
            for seed in (0, *cfg.seeds):
                fv.make_config(entry.method, n_particles=particles, num_steps=steps, seed=seed, eta=eta,
                               **entry.options)
    rows = run_suite(cfg, out)
    from fvdiffusion.durable import write_atomically

    write_atomically(out / "table.md", suite_report(rows, cfg, default_command(cfg, out)).encode("utf-8"))
    typer.echo(f"wrote {out / 'table.md'}")


def register(app: typer.Typer) -> None:
    app.command("suite")(suite)
