"""The ``fvd bench`` command group and its ``mnist`` command.

Heavy imports happen inside the command so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import (
    check_device, check_fits, check_out, check_range, fail, handles_errors, set_threads,
    threads_option,
)
from fvdiffusion.cli.sample import MNIST_BYTES_PER_PARTICLE
from fvdiffusion.durable import write_atomically

DEFAULT_OUT = Path("benchmarks/mnist")


def _int_list(text: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    """'1,2,3' -> (1, 2, 3); an empty string is an empty tuple (e.g. no sweep)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{name}: expected comma-separated integers, got {text!r}")


def _name_list(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _bootstrap_bytes_per_draw(cfg) -> int:
    """Counts over the cell's populations (int64, a few copies) and one statistic per feature space."""
    import math

    from fvdiffusion.bench.mnist.config import BON_KEEP_FRACTION

    keep = max(1, int(cfg.n_particles * BON_KEEP_FRACTION))
    populations = max(cfg.min_populations, math.ceil(max(cfg.samples_per_cell, cfg.tuning_samples) / keep))
    return 8 * populations * 4 + 64 * 8


@handles_errors
def mnist_command(
    preset: Optional[str] = typer.Option(None, help="quick (minutes on a CPU, for smoke tests), cpu (the CPU-reduced "
                                         "benchmark, about 45 min with --workers 2), paper (N = 128, K = 50, every "
                                         "class, and FVD on 20 DPM-Solver++(2M) steps: hours on 2 CPU cores; add "
                                         "--eta 0 for DDIM), wall (FID against wall "
                                         "time as N grows), gpu (the full benchmark on cuda). "
                                         "Other options override the preset's values."),
    quick: bool = typer.Option(False, "--quick", help="Same as --preset quick."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default benchmarks/mnist, or "
                                       "benchmarks/mnist/<preset> with a preset)."),
    classes: Optional[str] = typer.Option(None, help="Target classes, comma-separated (default 0-9)."),
    seeds: Optional[str] = typer.Option(None, help="Reported seeds, comma-separated (default 1,2,3). "
                                        "Seed 0 is the tuning seed."),
    samples_per_cell: Optional[int] = typer.Option(None, "--samples-per-cell", "--samples-per-class",
                                                   help="Least samples pooled per (method, class, seed) (default 1024)."),
    populations: Optional[int] = typer.Option(None, help="Least independent populations per cell (default 4)."),
    particles: Optional[int] = typer.Option(None, help="Particles N per population (default 64)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps K (default 50)."),
    eta: Optional[float] = typer.Option(None, help="Sampler of every method: 1 = DDPM ancestral steps (default), "
                                        "0 = deterministic DDIM; values between are DDIM(eta)."),
    methods: Optional[str] = typer.Option(None, help="Method rows, comma-separated (default: all of base, bon, "
                                          "smc-multinomial, smc-fk, smc-ess, smc-systematic, vasr, fvd, fvd-nu1, "
                                          "fvd-weighted, fvd-ctrl)."),
    svdd_candidates: Optional[str] = typer.Option(None, "--svdd-candidates",
                                                  help="SVDD budgets M, comma-separated (default 2,4,8; '' = none)."),
    dts_rollouts: Optional[str] = typer.Option(None, "--dts-rollouts",
                                               help="DTS rollouts as multiples of N, comma-separated (default 1,4)."),
    scaling_steps: Optional[str] = typer.Option(None, "--scaling-steps",
                                                help="Extra step counts for base/smc/fvd (default 25; '' = none)."),
    solver_steps: Optional[str] = typer.Option(None, "--solver-steps",
                                               help="Step counts of FVD with DPM-Solver++(2M) (its SDE variant at "
                                               "eta 1), set against the fvd row at --steps, comma-separated "
                                               "(default none; preset paper 20; '' = none)."),
    particle_sizes: Optional[str] = typer.Option(None, "--particle-sizes", help="Population sizes N of the quality-"
                                                 "against-wall-time sweep (bon, smc-systematic, vasr, fvd), comma-"
                                                 "separated (default none; preset wall 32,64,128,256)."),
    tune: Optional[bool] = typer.Option(None, "--tune/--no-tune", help="Tune every family on seed 0 and add "
                                        "<family>-tuned rows (default on)."),
    families: Optional[str] = typer.Option(None, help="Tuned families, comma-separated (default fvd, smc, smc-ess, "
                                           "smc-fk, vasr)."),
    tuning_classes: Optional[str] = typer.Option(None, "--tuning-classes", help="Classes scored when tuning (default 2,5,8)."),
    grid_points: Optional[int] = typer.Option(None, "--grid-points", help="Grid points per tuned family, the same "
                                              "for every family (default 4)."),
    tuning_samples: Optional[int] = typer.Option(None, "--tuning-samples", help="Samples per tuning cell (default 512)."),
    feature_spaces: Optional[str] = typer.Option(None, "--feature-spaces", help="FID/KID feature spaces, "
                                                 "comma-separated (default: every installed one)."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap draws of the populations (default 1000)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N that this machine has (default cpu; "
                                         "gpu preset cuda)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro-batch for every network call "
                                             "(default: whole population; results do not depend on it)."),
    workers: Optional[int] = typer.Option(None, help="Cells run in this many processes (default 1; cpu preset 2)."),
    images: Optional[bool] = typer.Option(None, "--images/--no-images", help="Keep every sample in results.jsonl "
                                          "(default on; gpu preset off: rows then keep their scores and a preview)."),
    threads: int = threads_option(),
    tune_only: bool = typer.Option(False, "--tune-only", help="Run only the tuning cells (seed 0) and write "
                                   "tuning.md: the choice, before any reported cell runs."),
    report_only: bool = typer.Option(False, "--report-only", help="Write results.md and figures from the existing "
                                     "results.jsonl without running any cell."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Every method on class-conditional MNIST (r = log p(c|x), lambda = 1): FID and KID per feature space
    with population-bootstrap intervals, paired comparisons with win counts, diversity and cost; writes
    results.jsonl, results.md and figures.

    Resumable: finished (method, class, seed) cells in OUT/results.jsonl are not rerun.
    """
    from fvdiffusion.bench.mnist import MnistBenchConfig, mnist_report, reproduce_command, run_mnist_bench, summarise
    from fvdiffusion.bench.mnist.plots import write_figures
    from fvdiffusion.bench.mnist.scoring import Scorer

    if quick:
        if preset not in (None, "quick"):
            fail(f"--quick conflicts with --preset {preset}")
        preset = "quick"
    set_threads(threads)
    if device is not None:
        check_device(device)
    values = dict(
        classes=_int_list(classes, "--classes"), seeds=_int_list(seeds, "--seeds"),
        samples_per_cell=samples_per_cell, min_populations=populations, n_particles=particles, num_steps=steps,
        eta=eta,
        rows=_name_list(methods), svdd_candidates=_int_list(svdd_candidates, "--svdd-candidates"),
        dts_rollout_factors=_int_list(dts_rollouts, "--dts-rollouts"),
        scaling_steps=_int_list(scaling_steps, "--scaling-steps"),
        solver_steps=_int_list(solver_steps, "--solver-steps"),
        particle_sizes=_int_list(particle_sizes, "--particle-sizes"), tune=tune, families=_name_list(families),
        tuning_classes=_int_list(tuning_classes, "--tuning-classes"), grid_points=grid_points,
        tuning_samples_per_cell=tuning_samples, feature_spaces=_name_list(feature_spaces), bootstrap=bootstrap,
        device=device, batch_size=batch_size, workers=workers, store_images=images,
    )
    if preset is not None:
        cfg = MnistBenchConfig.preset(preset, **values)
    else:
        cfg = MnistBenchConfig(**{k: v for k, v in values.items() if v is not None})
    if device is None and not report_only:  # the preset's device (gpu: cuda) must exist to compute
        check_device(cfg.device, f"--device (preset {preset})")
    step_counts = [("--steps", cfg.num_steps), *(("--scaling-steps", k) for k in cfg.scaling_steps),
                   *(("--solver-steps", k) for k in cfg.solver_steps)]
    for flag, steps_value in step_counts:
        check_range(flag, steps_value, 1, 1000, "the shipped DDPM has 1000 training steps")
    check_fits("--particles", cfg.n_particles * cfg.workers, MNIST_BYTES_PER_PARTICLE, cfg.device,
               what=f"particle, {cfg.workers} worker(s) at once")
    if cfg.particle_sizes:
        check_fits("--particle-sizes", max(cfg.particle_sizes) * cfg.workers, MNIST_BYTES_PER_PARTICLE, cfg.device,
                   what=f"particle, {cfg.workers} worker(s) at once")
    check_fits("--bootstrap", cfg.bootstrap, _bootstrap_bytes_per_draw(cfg), "cpu", what="bootstrap draw")
    out_dir = out or (DEFAULT_OUT / preset if preset else DEFAULT_OUT)
    check_out(out_dir)
    scorer = Scorer(cfg)
    if tune_only:
        if report_only:
            fail("--tune-only conflicts with --report-only")
        if not cfg.tune:
            fail("--tune-only needs tuning on (drop --no-tune)")
    outcome = run_mnist_bench(cfg, out_dir, scorer, progress_bar=progress, compute=not report_only, threads=threads,
                              tuning_only=tune_only)
    if tune_only:
        from fvdiffusion.bench.mnist.report import tuning_lines
        from fvdiffusion.bench.mnist.run import TUNING_SPACES

        spaces = tuple(s for s in scorer.spaces if s in TUNING_SPACES)
        text = "\n".join([f"# MNIST tuning (eta = {cfg.eta})\n", f"Reproduce: `{reproduce_command(cfg, out_dir)} "
                          "--tune-only`\n", *tuning_lines(outcome.tuning, cfg, spaces)]) + "\n"
        write_atomically(Path(out_dir) / "tuning.md", text.encode("utf-8"))
        typer.echo(f"wrote {Path(out_dir) / 'tuning.md'}")
        return
    if not outcome.rows:
        fail(f"no finished cells in {Path(out_dir) / 'results.jsonl'}")
    summaries = summarise(outcome, scorer)
    report = mnist_report(outcome, cfg, scorer, reproduce_command(cfg, out_dir), summaries)
    write_atomically(Path(out_dir) / "results.md", report.encode("utf-8"))
    figures = write_figures(outcome, summaries, scorer.primary, out_dir)
    typer.echo(f"wrote {Path(out_dir) / 'results.md'} and {', '.join(str(p) for p in figures)}")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command group (``fvd bench mnist``, ``fvd bench scaling``, ``fvd bench truth``) to the
    ``fvd`` app."""
    from fvdiffusion.cli.bench_scaling import scaling_command
    from fvdiffusion.cli.bench_truth import truth_command

    bench_app = typer.Typer(help="Benchmarks on the shipped MNIST zoo and the scaling of one population over "
                                 "processes.", no_args_is_help=True)
    bench_app.command("mnist")(mnist_command)
    bench_app.command("scaling")(scaling_command)
    bench_app.command("truth")(truth_command)
    app.add_typer(bench_app, name="bench")
