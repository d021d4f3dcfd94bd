"""``fvd t2i``: reward-align a diffusers text-to-image pipeline over a prompt file (runner: bench/t2i.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import fail

# the names of fvdiffusion.bench.t2i.REWARDS and DTYPES (that module imports torch; kept equal by a test)
REWARD_NAMES = ("brightness", "colourfulness", "jpeg", "clip", "aesthetic", "imagereward")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def t2i(
    model: str = typer.Option(..., help="diffusers pipeline: a local directory or a hub id"),
    prompts: Path = typer.Option(..., help="TXT (one prompt per line) or CSV with a 'Prompts' column"),
    reward: str = typer.Option(..., help=f"one of: {', '.join(REWARD_NAMES)}"),
    out: Path = typer.Option(..., help="output directory (images/, metrics.jsonl, run.json)"),
    method: str = typer.Option("fvd", help="sampling method (see fvdiffusion.METHODS)"),
    particles: int = typer.Option(8, help="particles (images) per prompt"),
    steps: int = typer.Option(50, help="denoising steps"),
    seed: int = typer.Option(0, help="base seed; prompt i uses seed + i"),
    batch_size: Optional[int] = typer.Option(None, help="micro-batch for UNet, VAE and reward (results do not change)"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale"),
    lam: float = typer.Option(1.0, help="reward scale λ"),
    option: list[str] = typer.Option([], help="method option KEY=VALUE, repeatable (e.g. rebirth_noise=0.5)"),
    reward_model: Optional[str] = typer.Option(None, help="CLIP model id/path (clip), predictor .safetensors (aesthetic), or ImageReward name"),
    device: str = typer.Option("auto", help="torch device; auto = cuda if available"),
    dtype: str = typer.Option("float32", help=f"pipeline dtype: {', '.join(DTYPE_NAMES)}"),
    progress: bool = typer.Option(True, help="show a progress bar over prompts"),
) -> None:
    """Reward-align a diffusers text-to-image pipeline over a prompt file (resumable)."""
    from fvdiffusion.bench.t2i import RunnerError, T2ISettings, run_t2i
    from fvdiffusion.cli.options import OptionError, parse_options
    from fvdiffusion.diffusers_align import UnsupportedPipelineError
    from fvdiffusion.rewards.model_rewards import MissingExtraError, MissingWeightsError
    from fvdiffusion.samplers import ConfigError

    try:
        options = parse_options(option)
        if "lam" in options:
            raise RunnerError("pass λ with --lam, not --option lam=…")
        settings = T2ISettings(model=model, reward=reward, reward_model=reward_model, method=method,
                               particles=particles, steps=steps, seed=seed, guidance=guidance, dtype=dtype,
                               options={**options, "lam": lam})
        metrics = run_t2i(settings, prompts, out, batch_size=batch_size, device=device, show_progress=progress)
    except (RunnerError, OptionError, ConfigError, MissingExtraError, MissingWeightsError, UnsupportedPipelineError) as exc:
        fail(str(exc))
    typer.echo(f"metrics: {metrics}")


def register(app: typer.Typer) -> None:
    app.command("t2i")(t2i)
