"""The ``fvd bench`` command group and its ``mnist`` command (mounted by cli.py).

Heavy imports happen inside the command so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEFAULT_OUT = Path("benchmarks/mnist")


def _int_list(text: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    """'1,2,3' -> (1, 2, 3); an empty string is an empty tuple (e.g. no sweep)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None


def mnist_command(
    quick: bool = typer.Option(False, "--quick", help="3 classes, 1 seed, 64 samples per class, 20 steps, small "
                               "sweeps (about 100k denoiser calls; minutes on a 2-core CPU)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default benchmarks/mnist, or "
                                       "benchmarks/mnist/quick with --quick)."),
    classes: Optional[str] = typer.Option(None, help="Target classes, comma-separated (default 0-9; quick 2,5,8)."),
    seeds: Optional[str] = typer.Option(None, help="Reported seeds, comma-separated (default 1,2,3; quick 1). "
                                        "Seed 0 is the tuning seed."),
    samples_per_class: Optional[int] = typer.Option(None, "--samples-per-class",
                                                    help="Samples scored per (method, class, seed) (default 256; quick 64)."),
    particles: Optional[int] = typer.Option(None, help="Particles N per population (default 64)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps K (default 50; quick 20)."),
    svdd_candidates: Optional[str] = typer.Option(None, "--svdd-candidates",
                                                  help="SVDD budgets M, comma-separated (default 2,4,8; quick 2,4; '' = none)."),
    dts_rollouts: Optional[str] = typer.Option(None, "--dts-rollouts",
                                               help="DTS rollouts as multiples of N, comma-separated (default 1,4; quick 1,2)."),
    scaling_steps: Optional[str] = typer.Option(None, "--scaling-steps",
                                                help="Extra step counts for base/smc/fvd (default 25; quick 10; '' = none)."),
    tune: bool = typer.Option(True, help="Tune FVD and SMC on seed 0 and add fvd-tuned / smc-tuned rows."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro-batch for every network call "
                                             "(default: whole population; results do not depend on it)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    report_only: bool = typer.Option(False, "--report-only", help="Write results.md and figures from the existing "
                                     "results.jsonl without running any cell."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Every method on class-conditional MNIST (r = log p(c|x), lambda = 1): FID, accuracy, diversity,
    lineages and cost; writes results.jsonl, results.md and figures.

    Resumable: finished (method, class, seed) cells in OUT/results.jsonl are not rerun.
    """
    import torch

    from fvdiffusion.bench.mnist import MnistBenchConfig, mnist_report, reproduce_command, run_mnist_bench, summarise
    from fvdiffusion.bench.mnist_plots import write_figures

    if threads is not None:
        torch.set_num_threads(threads)
    values = dict(
        classes=_int_list(classes, "--classes"), seeds=_int_list(seeds, "--seeds"),
        samples_per_class=samples_per_class, n_particles=particles, num_steps=steps,
        svdd_candidates=_int_list(svdd_candidates, "--svdd-candidates"),
        dts_rollout_factors=_int_list(dts_rollouts, "--dts-rollouts"),
        scaling_steps=_int_list(scaling_steps, "--scaling-steps"),
        tune=tune, device=device, batch_size=batch_size,
    )
    try:
        if quick:
            cfg = MnistBenchConfig.quick(**values)
        else:
            cfg = MnistBenchConfig(**{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        _fail(str(exc))
    out_dir = out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    try:
        outcome = run_mnist_bench(cfg, out_dir, progress_bar=progress, compute=not report_only)
    except (ValueError, FileNotFoundError) as exc:  # missing data or weights, unusable device
        _fail(str(exc))
    if not outcome.rows:
        _fail(f"no finished cells in {out_dir / 'results.jsonl'}")
    (Path(out_dir) / "results.md").write_text(mnist_report(outcome, cfg, reproduce_command(cfg, out_dir)))
    figures = write_figures(outcome, summarise(outcome), out_dir)
    typer.echo(f"wrote {Path(out_dir) / 'results.md'} and {', '.join(str(p) for p in figures)}")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command group (``fvd bench mnist``) to the ``fvd`` app."""
    bench_app = typer.Typer(help="Benchmarks on the shipped MNIST zoo.", no_args_is_help=True)
    bench_app.command("mnist")(mnist_command)
    app.add_typer(bench_app, name="bench")
