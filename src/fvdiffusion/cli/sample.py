"""`fvd sample`: align the shipped MNIST DDPM to one digit class, offline, with any method."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from fvdiffusion.cli.errors import fail
from fvdiffusion.cli.options import parse_options


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

    def __post_init__(self) -> None:
        if isinstance(self.target_class, bool) or not 0 <= self.target_class <= 9:
            raise ValueError(f"--class must be a digit 0-9, got {self.target_class}")
        if not self.methods:
            raise ValueError("--compare needs at least one method")


def run_sample_job(job: SampleJob, out: Path, progress: bool = True) -> dict[str, Any]:
    """Sample with every method of the job; writes the PNG(s) and metrics JSON into ``out``."""
    import torch

    import fvdiffusion as fv
    from fvdiffusion.bench.images import save_grid, save_rows
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import default_path, load_ddpm, load_eval_net, load_reward_classifier

    def weights(kind: str) -> Path | None:
        return None if job.weights_dir is None else job.weights_dir / default_path(kind).name

    denoiser = load_ddpm(weights("ddpm"), device=job.device)
    reward = ClassifierReward(load_reward_classifier(weights("reward_classifier"), device=job.device),
                              job.target_class)
    judge = load_eval_net(weights("eval_net"), device=job.device)
    # validate every method's options before spending any compute
    for method in job.methods:
        fv.make_config(method, n_particles=job.particles, num_steps=job.steps, seed=job.seed, eta=job.eta,
                       lam=job.lam, batch_size=job.batch_size, **_options_for(method, job.options))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"class": job.target_class, "runs": {}}
    rows = []
    for method in job.methods:
        res = fv.sample(method, denoiser, reward, n_particles=job.particles, num_steps=job.steps, seed=job.seed,
                        eta=job.eta, lam=job.lam, batch_size=job.batch_size, progress=progress,
                        **_options_for(method, job.options))
        with torch.no_grad():
            predicted = judge(res.samples.clamp(-1, 1)).argmax(1)
        accuracy = float((predicted == job.target_class).float().mean())
        order = torch.argsort(res.rewards, descending=True)
        save_grid(res.samples[order], out / f"{method}.png", ncols=8)
        rows.append((f"{method}\nacc {accuracy:.2f}", res.samples[order]))
        report["runs"][method] = {
            **res.summary(), "eval_accuracy": accuracy,
            "genealogy": res.lineage.genealogy_curve(), "grid": f"{method}.png", "config": res.config,
        }
    if len(job.methods) > 1:
        save_rows(rows, out / "compare.png")
        report["compare"] = "compare.png"
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """--option values apply to every compared method that has that field."""
    import fvdiffusion as fv

    if not options:
        return {}
    fields = fv.METHODS[method].config_class.field_names() if method in fv.METHODS else set()
    return {k: v for k, v in options.items() if k in fields}


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_command(
        target_class: int = typer.Option(7, "--class", help="Digit 0-9 to align to: r(x) = log p(class | x0)."),
        method: str = typer.Option("fvd", help="base, bon, smc, vasr, fvd, svdd, dts or dts*."),
        compare: Optional[str] = typer.Option(None, help="Comma-separated methods (e.g. fvd,smc,base): "
                                              "runs each and writes compare.png with a row per method."),
        particles: int = typer.Option(64, help="Particles N."),
        steps: int = typer.Option(50, help="Denoising steps K."),
        seed: int = typer.Option(0),
        eta: float = typer.Option(1.0, help="DDIM eta (1 = DDPM ancestral, 0 = deterministic DDIM)."),
        lam: float = typer.Option(1.0, help="Reward scale lambda (1 targets the class-conditional law)."),
        batch_size: Optional[int] = typer.Option(None, help="Micro-batch for the UNet and classifier."),
        option: List[str] = typer.Option([], "--option", help="Method option KEY=VALUE (repeat), "
                                         "e.g. --option rebirth_noise=0.5 --option scheme=systematic."),
        weights_dir: Optional[Path] = typer.Option(None, help="Directory with ddpm / reward_classifier / "
                                                   "eval_net .safetensors (default: the shipped ones)."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
        out: Path = typer.Option(Path("runs/sample"), help="Output directory."),
        progress: bool = typer.Option(True, help="Show a progress bar per method."),
    ) -> None:
        """Align the shipped MNIST DDPM to one class and write a sample grid and metrics.json.

        Everything runs offline from the weights shipped in the package.
        """
        import torch

        from fvdiffusion.loop import RewardError
        from fvdiffusion.zoo.loaders import WeightsError, WeightsMissingError

        if threads is not None:
            torch.set_num_threads(threads)
        try:
            methods = tuple(m.strip() for m in compare.split(",") if m.strip()) if compare else (method,)
            job = SampleJob(target_class, methods, particles, steps, seed, eta, lam, batch_size,
                            parse_options(option), weights_dir, device)
            report = run_sample_job(job, out, progress=progress)
        except (ValueError, WeightsMissingError, WeightsError, RewardError) as exc:
            fail(str(exc))
        for name, run in report["runs"].items():
            bad = f", NON-FINITE rewards {run['nonfinite_rewards']}" if run["nonfinite_rewards"] else ""
            typer.echo(f"{name}: reward {run['reward_mean']:.3f}, eval accuracy {run['eval_accuracy']:.2f}, "
                       f"distinct samples {run['distinct_samples']}, K/2 ancestors among them "
                       f"{run['distinct_midpoint_ancestors']}, denoiser calls {run['cost_denoiser_calls']}, "
                       f"{run['cost_wall_seconds']:.1f} s{bad}")
        typer.echo(f"wrote {out / 'metrics.json'} and " +
                   ", ".join(str(out / run["grid"]) for run in report["runs"].values()) +
                   (f", {out / 'compare.png'}" if "compare" in report else ""))
