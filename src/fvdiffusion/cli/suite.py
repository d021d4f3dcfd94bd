"""``fvd suite``: the declared tuning suite that picks FVD's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from fvdiffusion.cli.errors import fail


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
        fail(str(exc))
    rows = run_suite(cfg, out)
    (out / "table.md").write_text(suite_report(rows, cfg, default_command(cfg, out)))
    typer.echo(f"wrote {out / 'table.md'}")


def register(app: typer.Typer) -> None:
    app.command("suite")(suite)
