"""``fvd bench scaling``: one FVD population over 1, 2 (4) processes, timed and metered.

Mounted into the ``bench`` group by :func:`fvdiffusion.cli.bench_mnist.register`.
Heavy imports happen inside the command so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import check_device, check_out, check_range, fail, handles_errors, set_threads, threads_option

DEFAULT_OUT = Path("benchmarks/scaling")
DEVICES = ("cpu", "cuda")


def _procs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"--procs: expected comma-separated integers, got {text!r}")
    if not values:
        fail("--procs: expected at least one process count")
    if len(set(values)) < len(values):
        fail(f"--procs: a process count is repeated in {text!r}")
    for value in values:
        check_range("--procs", value, 1, 4, "every run has 4 noise chunks and a process holds whole chunks")
    return values


def _testbeds(text: str) -> tuple[str, ...]:
    from fvdiffusion.bench.scaling import TESTBEDS

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in TESTBEDS]
    if not names or unknown:
        got = ",".join(unknown) if unknown else "nothing"
        fail(f"--testbeds: got {got!r}; expected some of {','.join(TESTBEDS)}, comma-separated")
    return names


@handles_errors
def scaling_command(
    out: Path = typer.Option(DEFAULT_OUT, help="Output directory: results.jsonl, results.md, scaling.png."),
    procs: str = typer.Option("1,2", help="Process counts, comma-separated, each in [1, 4]."),
    testbeds: str = typer.Option("toy,mnist", help="Testbeds, comma-separated: toy (2-D mixture, exact denoiser), "
                                 "mnist (the shipped DDPM and classifier)."),
    repeats: Optional[int] = typer.Option(None, help="Timed runs per configuration, the median is reported "
                                          "(default 3; 1 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny grid for smoke tests: toy N 16, 64; MNIST N 16; "
                               "K=2, 1 repeat."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUT/results.jsonl and start over."),
    report_only: bool = typer.Option(False, "--report-only", help="Write results.md and scaling.png from the "
                                     "existing results.jsonl without running anything."),
    device: str = typer.Option("cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)."),
    threads: int = threads_option("torch CPU threads per worker process, an integer >= 1 (default 1)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Strong scaling of one FVD population spread over processes: seconds per step, particle bytes
    moved per selection against the bound 2 x dead fraction x N x particle size, scalar bytes gathered.

    Resumable: runs already in OUT/results.jsonl are not rerun.
    """
    from fvdiffusion.bench.scaling import ScalingConfig, reproduce_command, run_scaling, tqdm_progress, write_outputs

    set_threads(threads)
    if device not in DEVICES:
        fail(f"--device {device}: expected one of {', '.join(DEVICES)}")
    repeats = repeats if repeats is not None else 1 if quick else 3
    check_range("--repeats", repeats, 1, 100)
    names = _testbeds(testbeds)
    if device == "cuda" and "toy" in names:
        fail("--device cuda: the toy testbed's exact mixture denoiser runs on the CPU; add --testbeds mnist")
    cfg = ScalingConfig(testbeds=names, procs=_procs(procs), repeats=repeats, quick=quick, device=device,
                        threads=threads)
    if device == "cuda" and not report_only:
        check_device(device)
    check_out(out)
    if report_only:
        rows = _existing_rows(cfg, out)
    else:
        from fvdiffusion.distributed import collective_timeout

        collective_timeout()  # the groups' timeout (FVD_COLLECTIVE_TIMEOUT): a bad value is one line now
        rows = run_scaling(cfg, out, fresh=fresh, progress=tqdm_progress() if progress else None)
    if not rows:
        fail(f"no finished runs of this grid in {out / 'results.jsonl'}")
    paths = write_outputs(cfg, rows, out, reproduce_command(cfg, out))
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")


def _existing_rows(cfg, out: Path) -> list[dict]:
    from fvdiffusion.bench.scaling import KEY_FIELDS, grid_rows
    from fvdiffusion.durable import RecordLog

    return grid_rows(cfg, RecordLog(out / "results.jsonl", KEY_FIELDS).rows)
