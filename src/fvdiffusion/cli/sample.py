"""`fvd sample`: align the shipped MNIST DDPM to one digit class, offline, with any method."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from fvdiffusion.cli.errors import (
    check_device, check_finite, check_fits, check_out, check_range, handles_errors, set_threads,
    threads_option,
)
from fvdiffusion.cli.options import options_for, parse_options

# CLI flags that set config fields: `--option lam=...` is refused with the flag to use
SAMPLE_FLAGS = {"n_particles": "--particles", "num_steps": "--steps", "eta": "--eta", "lam": "--lam",
                "seed": "--seed", "batch_size": "--batch-size", "noise_chunk": "--noise-chunk"}
# Tree and candidate methods search from one process: they cannot share a population
UNSHARDABLE = ("svdd", "dts", "dts*")
# A particle's working set: 1x28x28 float32 images in the state, x0 prediction, noise and
# candidate copies, lineage and the result (a generous bound; network activations are
# bounded separately by --batch-size).
MNIST_BYTES_PER_PARTICLE = 28 * 28 * 4 * 32
DEFAULT_EVAL_BATCH = 256  # eval-net micro-batch when --batch-size is not given


@dataclass(frozen=True)
class SampleJob:
    target_class: int
    methods: tuple[str, ...]
    particles: int
    steps: int
    seed: int
    eta: float
    lam: float
    batch_size: int | None
    options: dict[str, Any]
    weights_dir: Path | None
    device: str
    noise_chunk: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_class, bool) or not 0 <= self.target_class <= 9:
            raise ValueError(f"--class must be a digit 0-9, got {self.target_class}")
        if not self.methods:
            raise ValueError("--compare needs at least one method")


def batched_argmax(net: Callable[[Any], Any], images: Any, batch_size: int) -> Any:
    """``net(images).argmax(1)`` computed ``batch_size`` images at a time (memory bounded by the batch)."""
    import torch

    with torch.no_grad():
        return torch.cat([net(chunk).argmax(1) for chunk in images.split(batch_size)])


def validate_job(job: SampleJob) -> None:
    """Every method's full config, built before anything is loaded (names the bad field)."""
    import fvdiffusion as fv

    for method in job.methods:
        fv.make_config(method, n_particles=job.particles, num_steps=job.steps, seed=job.seed, eta=job.eta,
                       lam=job.lam, batch_size=job.batch_size, noise_chunk=job.noise_chunk,
                       **options_for(method, job.options))


def run_sample_job(job: SampleJob, out: Path, progress: bool = True) -> dict[str, Any] | None:
    """Sample with every method of the job; writes the PNG(s) and metrics JSON into ``out``.

    In a process group every rank samples its block of each population; rank 0 alone judges,
    writes and returns the report (the other ranks return None).
    """
    import torch

    import fvdiffusion as fv
    from fvdiffusion.bench.common.images import save_grid, save_rows
    from fvdiffusion.jsonsafe import strict_json_dumps
    from fvdiffusion.launch import is_rank_zero, rank_device
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import default_path, load_ddpm, load_eval_net, load_reward_classifier

    def weights(kind: str) -> Path | None:
        return None if job.weights_dir is None else job.weights_dir / default_path(kind).name

    validate_job(job)  # before spending any compute
    device = rank_device(job.device)
    writer = is_rank_zero()
    denoiser = load_ddpm(weights("ddpm"), device=device)
    reward = ClassifierReward(load_reward_classifier(weights("reward_classifier"), device=device),
                              job.target_class)
    judge = load_eval_net(weights("eval_net"), device=device) if writer else None
    report: dict[str, Any] = {"class": job.target_class, "runs": {}}
    rows = []
    for method in job.methods:
        res = fv.sample(method, denoiser, reward, n_particles=job.particles, num_steps=job.steps, seed=job.seed,
                        eta=job.eta, lam=job.lam, batch_size=job.batch_size, progress=progress and writer,
                        noise_chunk=job.noise_chunk, **options_for(method, job.options))
        if not writer:
            continue
        predicted = batched_argmax(judge, res.samples.clamp(-1, 1), job.batch_size or DEFAULT_EVAL_BATCH)
        accuracy = float((predicted == job.target_class).float().mean())
        order = torch.argsort(res.rewards, descending=True)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(res.samples[order], out / f"{method}.png", ncols=8)
        rows.append((f"{method}\nacc {accuracy:.2f}", res.samples[order]))
        report["runs"][method] = {
            **res.summary(), "eval_accuracy": accuracy,
            "genealogy": res.lineage.genealogy_curve(), "grid": f"{method}.png", "config": res.config,
        }
        if "distributed" in res.extras:
            report["runs"][method]["distributed"] = res.extras["distributed"]
    if not writer:
        return None
    if len(job.methods) > 1:
        save_rows(rows, out / "compare.png")
        report["compare"] = "compare.png"
    from fvdiffusion.durable import write_atomically

    write_atomically(out / "metrics.json", (strict_json_dumps(report, indent=2) + "\n").encode("utf-8"))
    return report


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


@handles_errors
def sample_command(
    target_class: int = typer.Option(7, "--class", help="Digit 0-9 to align to: r(x) = log p(class | x0)."),
    method: str = typer.Option("fvd", help="base, bon, smc, vasr, fvd, svdd, dts or dts*."),
    compare: Optional[str] = typer.Option(None, help="Comma-separated methods (e.g. fvd,smc,base): "
                                          "runs each and writes compare.png with a row per method."),
    particles: int = typer.Option(64, help="Particles N."),
    steps: int = typer.Option(50, help="Denoising steps K (at most the DDPM's 1000 training steps)."),
    seed: int = typer.Option(0),
    eta: float = typer.Option(1.0, help="DDIM eta (1 = DDPM ancestral, 0 = deterministic DDIM)."),
    lam: float = typer.Option(1.0, help="Reward scale lambda (1 targets the class-conditional law; inf only "
                              "for argmax methods)."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch for the UNet, the classifier and the "
                                             f"evaluation net (default: whole population; eval {DEFAULT_EVAL_BATCH})."),
    option: List[str] = typer.Option([], "--option", help="Method option KEY=VALUE (repeat), "
                                     "e.g. --option rebirth_noise=0.5 --option scheme=systematic."),
    weights_dir: Optional[Path] = typer.Option(None, help="Directory with ddpm / reward_classifier / "
                                               "eval_net .safetensors (default: the shipped ones)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    threads: int = threads_option(),
    nproc: int = typer.Option(1, help="Spread each population over this many local processes (gloo on the CPU, "
                              "one GPU each with --device cuda). Under torchrun leave it at 1."),
    noise_chunk: Optional[int] = typer.Option(None, help="Draw noise per chunk of this many particle slots, so "
                                              "that --nproc 1 and --nproc K give the same samples (default with "
                                              "several processes: N/16, at most 256; with one: one stream)."),
    out: Path = typer.Option(Path("runs/sample"), help="Output directory."),
    progress: bool = typer.Option(True, help="Show a progress bar per method."),
) -> None:
    """Align the shipped MNIST DDPM to one class and write a sample grid and metrics.json.

    Everything runs offline from the weights shipped in the package. One population can span
    several processes: ``--nproc K`` starts them here, or run
    ``torchrun --nproc-per-node K -m fvdiffusion.cli sample ...`` (rank 0 writes the outputs).
    """
    set_threads(threads)
    device = check_device(device)
    check_out(out)
    check_finite("--eta", eta)
    check_finite("--lam", lam, allow_inf=True)
    check_range("--particles", particles, 1)
    check_range("--steps", steps, 1, 1000, "the shipped DDPM has 1000 training steps")
    check_range("--batch-size", batch_size, 1)
    check_range("--nproc", nproc, 1)
    check_range("--noise-chunk", noise_chunk, 1)
    check_fits("--particles", particles, MNIST_BYTES_PER_PARTICLE, device)
    methods = tuple(m.strip() for m in compare.split(",") if m.strip()) if compare else (method,)
    flag = "--compare" if compare else "--method"
    options = parse_options(option, methods, SAMPLE_FLAGS) if option else {}
    if not methods:
        raise ValueError(f"{flag} needs at least one method")
    from fvdiffusion import group_env
    from fvdiffusion.distributed import collective_timeout

    torchrun = group_env.read_env() is not None  # torchrun's variables checked, one line naming a bad one
    _check_processes(nproc, torchrun, methods, device, particles, noise_chunk)
    if nproc > 1 or torchrun:
        collective_timeout()  # a malformed FVD_COLLECTIVE_TIMEOUT is one line before anything starts
    job = SampleJob(target_class, methods, particles, steps, seed, eta, lam, batch_size, options, weights_dir, device,
                    noise_chunk)
    if nproc > 1:
        from fvdiffusion.launch import launch

        validate_job(job)
        report = launch(run_sample_job, (job, out, progress), nproc=nproc, threads=threads,
                        backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        from fvdiffusion.launch import join_environment_group

        join_environment_group(device)
        report = run_sample_job(job, out, progress=progress)
        if report is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
    for name, run in report["runs"].items():
        bad = f", NON-FINITE rewards {run['nonfinite_rewards']}" if run["nonfinite_rewards"] else ""
        typer.echo(f"{name}: reward {_fmt(run['reward_mean'], '.3f')}, eval accuracy {run['eval_accuracy']:.2f}, "
                   f"distinct samples {run['distinct_samples']}, K/2 ancestors among them "
                   f"{run['distinct_midpoint_ancestors']}, denoiser calls {run['cost_denoiser_calls']}, "
                   f"{run['cost_wall_seconds']:.1f} s{bad}")
    typer.echo(f"wrote {out / 'metrics.json'} and " +
               ", ".join(str(out / run["grid"]) for run in report["runs"].values()) +
               (f", {out / 'compare.png'}" if "compare" in report else ""))


def _check_processes(nproc: int, torchrun: bool, methods: tuple[str, ...], device: str, particles: int,
                     noise_chunk: int | None) -> None:
    """One line for each way a multi-process run cannot work, before anything starts."""
    if nproc > 1 and torchrun:
        raise ValueError(f"--nproc {nproc}: this process was started by torchrun (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); use --nproc 1 under torchrun")
    if nproc == 1 and not torchrun:
        return
    shared = [m for m in methods if m in UNSHARDABLE]
    if shared:
        raise ValueError(f"--nproc: method {shared[0]} searches from one process and cannot share a population "
                         f"over processes; run it with --nproc 1")
    if nproc > 1 and device.startswith("cuda:"):
        raise ValueError(f"--device {device} with --nproc {nproc}: use --device cuda (one GPU per process)")
    if nproc > particles:
        raise ValueError(f"--nproc {nproc}: more processes than --particles {particles}")
    from fvdiffusion.distributed import default_chunk

    chunk = noise_chunk or default_chunk(particles)
    if nproc > -(-particles // chunk):
        raise ValueError(f"--noise-chunk {chunk}: {particles} particles make {-(-particles // chunk)} chunk(s), fewer "
                         f"than --nproc {nproc} (each process holds whole chunks); use --noise-chunk <= "
                         f"{particles // nproc}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
