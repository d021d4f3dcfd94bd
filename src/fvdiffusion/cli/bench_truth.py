"""``fvd bench truth``: every population method against the exact tilt of the same K-step sampler,
on the shipped MNIST DDPM with the mean-ink reward.

Mounted into the ``bench`` group by :func:`fvdiffusion.cli.bench_mnist.register`.
Heavy imports happen inside the command so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import (
    check_device, check_finite, check_fits, check_out, check_range, fail, handles_errors, set_threads,
    threads_option,
)
from fvdiffusion.cli.sample import MNIST_BYTES_PER_PARTICLE

DEFAULT_OUT = Path("benchmarks/mnist_truth")
STAGES = ("reference", "compare", "report")
SAMPLER_CHOICES = ("ddpm", "ddim", "both")


def _samplers(text: str) -> tuple[str, ...]:
    if text not in SAMPLER_CHOICES:
        fail(f"--sampler {text}: expected one of {', '.join(SAMPLER_CHOICES)}")
    return ("ddpm", "ddim") if text == "both" else (text,)


def _methods(text: Optional[str]) -> tuple[str, ...]:
    from fvdiffusion.bench.truth.config import METHODS
    from fvdiffusion.config import did_you_mean

    if text is None:
        return ()
    labels = tuple(part.strip() for part in text.split(",") if part.strip())
    if not labels:
        fail(f"--methods: expected some of {','.join(METHODS)}, comma-separated")
    for label in labels:
        if label not in METHODS:
            fail(f"--methods: unknown method {label!r}{did_you_mean(label, METHODS)}; expected some of "
                 f"{','.join(METHODS)}")
    if len(set(labels)) < len(labels):
        fail(f"--methods: a method is repeated in {text!r}")
    return labels


@handles_errors
def truth_command(
    stage: str = typer.Option(..., help="reference: draw the base samples and compute the SNIS reference "
                              "(resumable); compare: run every method's populations and score them (resumable); "
                              "report: rewrite results.md and reference.json from what is on disk."),
    sampler: str = typer.Option("both", help="ddpm (eta 1), ddim (eta 0) or both (one after the other)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps K of every sampler (default 20; --quick 2)."),
    base_samples: Optional[int] = typer.Option(None, "--base-samples", help="Base samples per sampler type for the "
                                               "reference (default 20000; --quick 200)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Base samples per shard, one resumable "
                                             "row each (default 250; --quick 100)."),
    lam: Optional[float] = typer.Option(None, help="Tilt strength lambda on the mean-ink reward (default 20)."),
    particles: Optional[int] = typer.Option(None, help="Particles N per population (default 128; --quick 16)."),
    populations: Optional[int] = typer.Option(None, help="Populations per method, on reported seeds 1..P "
                                              "(default 16; --quick 2). Seed 0, the tuning seed, is never run."),
    methods: Optional[str] = typer.Option(None, help="Methods to compare, comma-separated (default: all of "
                                          "fvdiffusion.bench.truth.config.METHODS)."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap draws for the intervals (default 1000; "
                                            "--quick 200)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes that run in seconds (K=2, 200 base samples, "
                               "N=16, 2 populations), for tests. Other options override its values."),
    out: Optional[Path] = typer.Option(None, help="Output directory: base_<sampler>.jsonl, results.jsonl, "
                                       "results.md, reference.json (default benchmarks/mnist_truth, or "
                                       "benchmarks/mnist_truth/quick with --quick)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N that this machine has."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro-batch of the compared populations' "
                                             "network calls (default: automatic; results do not depend on it)."),
    threads: int = threads_option(),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Ground truth on the shipped MNIST DDPM: SNIS of a large base sample gives the exact tilt
    p_K(x0) exp(lambda r(x0)) of the same K-step sampler; every method's populations are scored by
    their standardised error on a few statistics of x0, with bootstrap intervals. Writes results.md.

    Resumable: finished shards (base_<sampler>.jsonl) and populations (results.jsonl) are not rerun.
    """
    set_threads(threads)
    if stage not in STAGES:
        fail(f"--stage {stage}: expected one of {', '.join(STAGES)}")
    names = _samplers(sampler)
    check_range("--steps", steps, 1, 1000, "the shipped DDPM has 1000 training steps")
    check_range("--base-samples", base_samples, 2)
    check_range("--shard-size", shard_size, 1)
    check_finite("--lam", lam)
    if lam is not None and lam < 0:
        fail(f"--lam must be >= 0, got {lam}")
    check_range("--particles", particles, 2)
    check_range("--populations", populations, 1)
    check_range("--bootstrap", bootstrap, 2)
    check_range("--batch-size", batch_size, 1)
    labels = _methods(methods)
    check_device(device)
    values = dict(steps=steps, base_samples=base_samples, shard_size=shard_size, lam=lam, n_particles=particles,
                  populations=populations, bootstrap=bootstrap, batch_size=batch_size)
    values = {k: v for k, v in values.items() if v is not None}
    from fvdiffusion.bench.truth.run import TruthPlan

    plan = (TruthPlan.quick_plan if quick else TruthPlan)(samplers=names, methods=labels, **values)
    if stage == "reference":
        check_fits("--shard-size", plan.shard_size, MNIST_BYTES_PER_PARTICLE, device)
    if stage == "compare":
        check_fits("--particles", plan.n_particles, MNIST_BYTES_PER_PARTICLE, device)
    out_dir = out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    check_out(out_dir)
    _run(stage, plan, out_dir, device, threads, progress)


def _run(stage: str, plan, out_dir: Path, device: str, threads: int, progress: bool) -> None:
    from fvdiffusion.bench.truth.compare import run_compare
    from fvdiffusion.bench.truth.reference import run_reference
    from fvdiffusion.bench.truth.run import write_outputs
    from fvdiffusion.bench.truth.testbed import mnist_testbed

    testbed = mnist_testbed(device)
    for sampler in plan.samplers:
        if stage == "reference":
            run_reference(testbed, plan.reference_cfg(sampler), out_dir, progress_bar=progress)
        elif stage == "compare":
            run_compare(testbed, plan.compare_cfg(sampler), out_dir, progress_bar=progress)
        if stage != "report":  # a report after each sampler type: the first is readable while the second runs
            write_outputs(testbed, plan, out_dir, threads)
    outcomes, paths = write_outputs(testbed, plan, out_dir, threads)
    for o in outcomes:
        if o.reference is not None:
            m = o.reference.moments
            typer.echo(f"{o.sampler}: {o.base.n} base samples, SNIS ESS {m.ess:,.0f}, reward shift "
                       f"{o.reward_shift:+.2f} base std" + ("" if o.base.complete else " (reference incomplete)"))
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")
