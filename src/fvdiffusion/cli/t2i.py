"""``fvd t2i``: reward-align a diffusers text-to-image pipeline over a prompt file (runner: bench/t2i.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from fvdiffusion.cli.errors import (
    check_device, check_finite, check_fits, check_out, check_range, fail, handles_errors, set_threads,
    threads_option,
)

# the names of fvdiffusion.bench.t2i.REWARDS and DTYPES (that module imports torch; kept equal by a test)
REWARD_NAMES = ("brightness", "colourfulness", "jpeg", "clip", "aesthetic", "pickscore", "digit")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# CLI flags that set config fields: `--option lam=...` is refused with the flag to use
T2I_FLAGS = {"n_particles": "--particles", "num_steps": "--steps", "lam": "--lam", "seed": "--seed",
             "batch_size": "--batch-size", "eta": "--eta"}
# A particle's working set outside the networks: a 4x128x128 float32 latent (SD-XL size) in the
# state, x0, noise and candidate copies, plus its decoded 3x1024x1024 image (a generous bound)
LATENT_BYTES_PER_PARTICLE = 4 * 128 * 128 * 4 * 32 + 3 * 1024 * 1024 * 4


@handles_errors
def t2i(
    model: str = typer.Option(..., help="diffusers pipeline: a local directory or a hub id"),
    prompts: Optional[Path] = typer.Option(None, help="TXT (one prompt per line) or CSV with a 'Prompts' column, "
                                           "UTF-8 (text-to-image pipelines)"),
    populations: Optional[int] = typer.Option(None, help="unconditional pipelines (DDPMPipeline, DDIMPipeline): K "
                                              "independent populations, population i with seed + i (instead of --prompts)"),
    reward: str = typer.Option(..., help=f"one of: {', '.join(REWARD_NAMES)}"),
    out: Path = typer.Option(..., help="output directory (images/, metrics.jsonl, run.json)"),
    method: str = typer.Option("fvd", help="sampling method (see fvdiffusion.METHODS)"),
    particles: int = typer.Option(8, help="particles (images) per prompt"),
    steps: int = typer.Option(50, help="denoising steps"),
    seed: int = typer.Option(0, help="base seed; prompt i uses seed + i"),
    batch_size: Optional[int] = typer.Option(None, help="micro-batch for UNet, VAE and reward (results do not change)"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale (default: the pipeline's "
                                             "own, 7.5 for SD, 5.0 for SDXL)"),
    lam: float = typer.Option(1.0, help="reward scale λ (inf only for argmax methods)"),
    option: list[str] = typer.Option([], help="method option KEY=VALUE, repeatable (e.g. rebirth_noise=0.5)"),
    reward_model: Optional[str] = typer.Option(None, help="clip / pickscore: the model's local directory or hub id; aesthetic: the predictor's "
                                               ".safetensors; digit: the target class 0..9 (refused for the "
                                               "other rewards)"),
    clip_model: Optional[str] = typer.Option(None, help="aesthetic: its CLIP backbone's local directory or hub id; "
                                             "pickscore: its tokenizer and image processor's (offline runs need "
                                             "a directory; refused for the other rewards)"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, mps, or auto = cuda if available"),
    dtype: str = typer.Option("float32", help=f"pipeline dtype: {', '.join(DTYPE_NAMES)}"),
    threads: int = threads_option(),
    revision: Optional[str] = typer.Option(None, help="hub revision (commit hash or tag) of --model to pin; "
                                           "ignored for a local directory"),
    progress: bool = typer.Option(True, help="show a progress bar over prompts"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt for classifier-free guidance"),
    height: Optional[int] = typer.Option(None, help="image height in pixels (default: the pipeline's)"),
    width: Optional[int] = typer.Option(None, help="image width in pixels (default: the pipeline's)"),
    eta: Optional[float] = typer.Option(None, help="DDIM η in [0, 1] (default: the method's, 1 = stochastic)"),
    eval_reward: Optional[str] = typer.Option(None, help="a second reward scored on the final images and "
                                              "reported, never used for selection"),
    eval_reward_model: Optional[str] = typer.Option(None, help="--eval-reward's model (as --reward-model)"),
    eval_clip_model: Optional[str] = typer.Option(None, help="--eval-reward's CLIP model (as --clip-model)"),
    compare_base: bool = typer.Option(False, help="also run method base from the same seed and write "
                                      "OUT/grids/iiii.png (base row vs aligned row)"),
    shard: Optional[str] = typer.Option(None, help="I/N: run prompts I, I+N, I+2N, ... (0 <= I < N) into "
                                        "OUT/metrics.shard-I-of-N.jsonl; a run without --shard merges them"),
    merge: bool = typer.Option(False, help="only merge the shards' results into metrics.jsonl and write "
                               "summary.json (no sampling)"),
) -> None:
    """Reward-align a diffusers text-to-image pipeline over a prompt file (resumable, shardable)."""
    set_threads(threads)
    device = check_device(device, allow_auto=True)
    check_out(out)
    check_finite("--guidance", guidance)
    check_finite("--lam", lam, allow_inf=True)
    if (prompts is None) == (populations is None):
        fail("give exactly one of --prompts FILE (text-to-image pipelines) and --populations K (unconditional "
             "pipelines such as an exported DDPMPipeline)")
    check_range("--populations", populations, 1)
    check_range("--particles", particles, 1)
    check_range("--steps", steps, 1)
    check_range("--batch-size", batch_size, 1)
    check_fits("--particles", particles, LATENT_BYTES_PER_PARTICLE, device)
    check_range("--height", height, 8)
    check_range("--width", width, 8)
    check_finite("--eta", eta)
    if eta is not None and not 0 <= eta <= 1:
        fail(f"--eta must be in [0, 1], got {eta}")
    if eval_reward_model is not None and eval_reward is None:
        fail("--eval-reward-model needs --eval-reward")
    if eval_clip_model is not None and eval_reward is None:
        fail("--eval-clip-model needs --eval-reward")
    if negative_prompt is not None and not negative_prompt.strip():
        fail("--negative-prompt is empty: leave it out for no negative prompt")
    shard_of = parse_shard(shard)
    if merge and shard_of is not None:
        fail("--merge combines the shards' results: run it without --shard")

    from fvdiffusion.bench.t2i import T2ISettings, run_t2i
    from fvdiffusion.cli.options import parse_options

    options = parse_options(option, (method,), T2I_FLAGS) if option else {}
    settings = T2ISettings(model=model, reward=reward, reward_model=reward_model, method=method,
                           particles=particles, steps=steps, seed=seed, guidance=guidance, dtype=dtype,
                           options={**options, "lam": lam, **({} if eta is None else {"eta": eta})},
                           revision=revision, negative_prompt=negative_prompt, height=height, width=width,
                           eval_reward=eval_reward, eval_reward_model=eval_reward_model, compare_base=compare_base,
                           clip_model=clip_model, eval_clip_model=eval_clip_model)
    metrics = run_t2i(settings, prompts, out, batch_size=batch_size, device=device, show_progress=progress,
                      shard=shard_of, merge_only=merge, populations=populations)
    typer.echo(f"metrics: {metrics}")
    summary = out / "summary.json"
    if shard_of is None and summary.is_file():
        typer.echo(f"summary: {summary.read_text().strip()}")


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'I/N' -> (I, N) with 0 <= I < N; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        fail(f"--shard must be I/N (e.g. 0/4: process 0 of 4), got {text!r}")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 0 <= i < n:
        fail(f"--shard {text}: need N >= 1 and 0 <= I < N (processes are numbered from 0)")
    return i, n


def register(app: typer.Typer) -> None:
    app.command("t2i")(t2i)
