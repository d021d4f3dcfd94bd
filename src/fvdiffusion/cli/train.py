"""The ``fvd train`` command group: ddpm, classifier, features, export, quality.

Option defaults are the recipe configs' defaults, so the CLI and the Python API agree.
"""

from __future__ import annotations

import signal
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import (
    check_device, check_finite, check_fits, check_out, check_range, handles_errors, set_threads,
    threads_option,
)

# The recipe configs' defaults that the options show, written out because the configs live beside
# the training code, which imports torch, and building the CLI (``fvd --help``) must not.
# tests/core/test_lazy_imports.py checks them against DDPMTrainConfig, ClassifierTrainConfig and
# FeatureNetTrainConfig.
DDPM_DEFAULTS = {"steps": 30_000, "batch_size": 128, "lr": 4e-4, "seed": 0, "checkpoint_every": 500}
CLASSIFIER_DEFAULTS = {"steps": 1200, "batch_size": 128, "lr": 2e-3}
FEATURES_DEFAULTS = {"steps": 3000, "batch_size": 128, "lr": 2e-3, "seed": 3}


# Memory bounds used to refuse sizes that cannot fit, before anything is loaded (generous:
# a training image carries the activations and gradients of the small MNIST networks; a
# sample the DDPM's state and the evaluation's copies).
TRAIN_BYTES_PER_IMAGE = 2_000_000
SAMPLE_BYTES = 28 * 28 * 4 * 8


class ClassifierKind(str, Enum):
    reward = "reward"
    eval = "eval"
    mlp = "mlp"


class ExportKind(str, Enum):
    ddpm = "ddpm"
    reward = "reward"
    eval = "eval"
    features = "features"
    mlp = "mlp"


def register(app: typer.Typer) -> None:
    """Add the ``train`` command group to the ``fvd`` app."""
    train_app = typer.Typer(help="Train the MNIST model zoo and export its shipped weights.", no_args_is_help=True)
    train_app.command("ddpm")(train_ddpm_command)
    train_app.command("classifier")(train_classifier_command)
    train_app.command("features")(train_features_command)
    train_app.command("export")(export_command)
    train_app.command("quality")(quality_command)
    app.add_typer(train_app, name="train")


@handles_errors
def train_ddpm_command(
    steps: int = typer.Option(DDPM_DEFAULTS["steps"], help="Total optimisation steps (a resumed run continues up to this)."),
    batch_size: int = typer.Option(DDPM_DEFAULTS["batch_size"], "--batch-size"),
    lr: float = typer.Option(DDPM_DEFAULTS["lr"], help="AdamW learning rate (constant after a linear warm-up)."),
    seed: int = typer.Option(DDPM_DEFAULTS["seed"]),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    out: Path = typer.Option(Path("runs/ddpm"), help="Run directory (checkpoint + log)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out (fresh if none)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop and checkpoint after this wall time."),
    checkpoint_every: int = typer.Option(DDPM_DEFAULTS["checkpoint_every"], "--checkpoint-every"),
    threads: int = threads_option(),
) -> None:
    """Train the unconditional MNIST DDPM (eps-prediction, linear VP schedule, EMA)."""
    from fvdiffusion.train.ddpm import DDPMTrainConfig, train_ddpm

    device = _setup(device, threads, out, lr, batch_size)
    check_finite("--max-minutes", max_minutes)
    config = DDPMTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             max_minutes=max_minutes, checkpoint_every=checkpoint_every)
    command = _command_line("ddpm", steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                            max_minutes=max_minutes)
    _checkpoint_on_sigterm()
    summary = train_ddpm(config, out, device=device, resume=resume, command=command)
    typer.echo(f"ddpm: step {summary.step}, loss {summary.loss}, {summary.elapsed_s:.0f} s; checkpoint {summary.checkpoint}")


@handles_errors
def train_classifier_command(
    kind: ClassifierKind = typer.Option(..., help="reward: the reward classifier; eval: the evaluation network; "
                                        "mlp: the MLP judge of the 'mlp' FID/KID space (never augmented)."),
    steps: int = typer.Option(CLASSIFIER_DEFAULTS["steps"], help="Optimisation steps."),
    batch_size: int = typer.Option(CLASSIFIER_DEFAULTS["batch_size"], "--batch-size"),
    lr: float = typer.Option(CLASSIFIER_DEFAULTS["lr"], help="AdamW peak learning rate (warm-up, then cosine decay)."),
    seed: Optional[int] = typer.Option(None, help="Default: 1 for reward, 2 for eval, 4 for mlp (they must differ)."),
    device: str = typer.Option("cpu"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<kind>_classifier)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out (same --steps: "
                                "the learning-rate decay depends on it)."),
    threads: int = threads_option(),
) -> None:
    """Train the reward classifier, the evaluation network or the MLP judge on clean MNIST digits."""
    from fvdiffusion.train.classifier import ClassifierTrainConfig, train_classifier

    out = out or Path(f"runs/{kind.value}_classifier")
    device = _setup(device, threads, out, lr, batch_size)
    overrides = {"steps": steps, "batch_size": batch_size, "lr": lr, **({} if seed is None else {"seed": seed})}
    config = ClassifierTrainConfig.for_kind(kind.value, **overrides)
    command = _command_line("classifier", kind=kind.value, steps=config.steps, batch_size=batch_size, lr=lr,
                            seed=config.seed, device=device)
    _checkpoint_on_sigterm()
    summary = train_classifier(config, out, device=device, resume=resume, command=command)
    typer.echo(f"{kind.value} classifier: step {summary.step}, reference accuracy {summary.reference_accuracy:.4f}, "
               f"{summary.elapsed_s:.0f} s; checkpoint {summary.checkpoint}")


@handles_errors
def train_features_command(
    steps: int = typer.Option(FEATURES_DEFAULTS["steps"], help="Optimisation steps."),
    batch_size: int = typer.Option(FEATURES_DEFAULTS["batch_size"], "--batch-size"),
    lr: float = typer.Option(FEATURES_DEFAULTS["lr"], help="AdamW peak learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(FEATURES_DEFAULTS["seed"]),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(Path("runs/feature_net"), help="Run directory (checkpoint + log)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out (same --steps: "
                                "the learning-rate decay depends on it)."),
    threads: int = threads_option(),
) -> None:
    """Train the feature autoencoder (no augmentation) whose latent is the 'ae' FID/KID space."""
    from fvdiffusion.train.feature_net import FeatureNetTrainConfig, train_feature_net

    device = _setup(device, threads, out, lr, batch_size)
    config = FeatureNetTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    command = _command_line("features", steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    _checkpoint_on_sigterm()
    summary = train_feature_net(config, out, device=device, resume=resume, command=command)
    typer.echo(f"feature net: step {summary.step}, reference reconstruction MSE {summary.reference_mse:.4f}, "
               f"{summary.elapsed_s:.0f} s; checkpoint {summary.checkpoint}")


@handles_errors
def export_command(
    kind: ExportKind = typer.Option(..., help="Which network the run trained."),
    run: Path = typer.Option(..., help="Run directory holding checkpoint.safetensors."),
    out: Path = typer.Option(..., help="Weights directory to write (required: an export never defaults to the "
                             "installed package's weights)."),
    fp16: bool = typer.Option(False, "--fp16", help="Store weights as float16 (half the size)."),
    quality_samples: int = typer.Option(0, "--quality-samples", help="DDPM only: also measure sample quality "
                                        "with this many samples (uses the shipped eval net) and put it in the card."),
    device: str = typer.Option("cpu", help="Where the quality sampling runs."),
    threads: int = threads_option(),
) -> None:
    """Write shipped weights (EMA for the DDPM) and a model card from a training run."""
    from fvdiffusion.train.export import export_run

    set_threads(threads)
    device = check_device(device)
    check_out(out)
    check_range("--quality-samples", quality_samples, 0)
    check_fits("--quality-samples", quality_samples, SAMPLE_BYTES, device, what="sample")
    result = export_run(kind.value, run, out_dir=out, fp16=fp16, quality_samples=quality_samples, device=device)
    typer.echo(f"wrote {result.weights} ({result.weights.stat().st_size / 1e6:.2f} MB) and {result.card}")


@handles_errors
def quality_command(
    n: int = typer.Option(1000, help="Number of samples."),
    steps: int = typer.Option(50, help="DDPM ancestral sampling steps."),
    seed: int = typer.Option(0),
    ddpm: Optional[Path] = typer.Option(None, help="DDPM weights (default: shipped)."),
    device: str = typer.Option("cpu"),
    out: Optional[Path] = typer.Option(None, help="Also write the report as JSON here."),
    update_card: bool = typer.Option(False, "--update-card", help="Write the result into the DDPM's model card "
                                     "(the .md beside the weights)."),
    threads: int = threads_option(),
) -> None:
    """Measure unconditional DDPM sample quality with the evaluation network."""
    from fvdiffusion.jsonsafe import strict_json_dumps
    from fvdiffusion.train.export import update_card_quality
    from fvdiffusion.train.quality import ddpm_quality
    from fvdiffusion.zoo.loaders import default_path, load_ddpm, load_eval_net

    set_threads(threads)
    device = check_device(device)
    if out is not None:
        check_out(out, kind="file")
    check_range("--n", n, 1)
    check_range("--steps", steps, 1, 1000, "the DDPM has 1000 training steps")
    check_fits("--n", n, SAMPLE_BYTES, device, what="sample")
    report = ddpm_quality(load_ddpm(ddpm, device=device), load_eval_net(device=device), n=n, steps=steps, seed=seed)
    text = strict_json_dumps(report.to_dict(), indent=2)
    typer.echo(text)
    if out is not None:
        from fvdiffusion.durable import write_atomically

        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, (text + "\n").encode("utf-8"))
    if update_card:
        card = (ddpm or default_path("ddpm")).with_suffix(".md")
        update_card_quality(card, report.to_dict())
        typer.echo(f"updated {card}")


def _setup(device: str, threads: int, out: Path, lr: float, batch_size: int) -> str:
    """The checks every training command makes before any data or model is loaded."""
    set_threads(threads)
    device = check_device(device)
    check_out(out)
    check_finite("--lr", lr)
    check_fits("--batch-size", batch_size, TRAIN_BYTES_PER_IMAGE, device, what="training image")
    return device


def _checkpoint_on_sigterm() -> None:
    # `kill PID` raises KeyboardInterrupt in the loop, which writes a final checkpoint
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _command_line(sub: str, **options) -> str:
    parts = ["fvd", "train", sub]
    for name, value in options.items():
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(parts)
