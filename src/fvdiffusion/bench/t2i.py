"""``fvd t2i``: align a diffusers text-to-image pipeline over a prompt file, resumably.

Reads a TXT file (one prompt per line) or a CSV with a ``Prompts`` column (DrawBench's
format). For prompt i it runs ``align()`` with seed ``seed + i``, writes the ranked images
to ``OUT/images/iiii/rr.png`` and appends one JSON line of metrics to ``OUT/metrics.jsonl``
once the images are on disk. A rerun skips the prompts already recorded; ``OUT/run.json``
holds the run's settings, and rerunning into the same directory with different settings is
refused rather than mixing two runs in one file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from fvdiffusion.diffusers_align import UnsupportedPipelineError, align
from fvdiffusion.rewards import image_rewards, model_rewards
from fvdiffusion.rewards.model_rewards import MissingExtraError, MissingWeightsError, require
from fvdiffusion.samplers import ConfigError, make_config

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "run.json"
DTYPES = ("float32", "float16", "bfloat16")


class RunnerError(Exception):
    """A user mistake in the runner's input; reported as one line, no traceback."""


# --- rewards by name ---------------------------------------------------------------------

def _aesthetic(reward_model: Optional[str], device: Any) -> Any:
    if reward_model is None:
        raise RunnerError("--reward aesthetic needs --reward-model PATH to the predictor's .safetensors weights")
    return model_rewards.AestheticScore(reward_model, device=device)


# name -> builder(reward_model, device); model-backed rewards import their extra only when built
REWARDS: dict[str, Callable[[Optional[str], Any], Any]] = {
    "brightness": lambda reward_model, device: image_rewards.Brightness(),
    "colourfulness": lambda reward_model, device: image_rewards.Colourfulness(),
    "jpeg": lambda reward_model, device: image_rewards.JpegCompressibility(),
    "clip": lambda reward_model, device: model_rewards.CLIPScore(reward_model or model_rewards.DEFAULT_CLIP, device=device),
    "aesthetic": _aesthetic,
    "imagereward": lambda reward_model, device: model_rewards.ImageRewardScore(reward_model or "ImageReward-v1.0", device=device),
}


# --- inputs ------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """Prompts from a TXT file (one per non-empty line) or a CSV with a ``Prompts`` column."""
    if not path.is_file():
        raise RunnerError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted prompts may hold newlines
        if "Prompts" not in (reader.fieldnames or []):
            raise RunnerError(f"{path.name}: CSV has no 'Prompts' column (columns: {', '.join(reader.fieldnames or [])})")
        prompts = [row["Prompts"].strip() for row in reader if (row["Prompts"] or "").strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RunnerError(f"{path.name}: no prompts found")
    return prompts


@dataclass(frozen=True)
class T2ISettings:
    """Everything that determines the outputs; stored in run.json and checked on resume."""

    model: str
    reward: str
    reward_model: Optional[str]
    method: str
    particles: int
    steps: int
    seed: int
    guidance: float
    dtype: str
    options: dict[str, Any] = field(default_factory=dict)


def check_settings(out: Path, settings: T2ISettings) -> None:
    """Refuse to continue a run that was made with other settings."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    current = _settings_json(settings)
    stored = json.loads(path.read_text())
    changed = [k for k in current if stored.get(k) != current[k]]
    if changed:
        k = changed[0]
        raise RunnerError(
            f"{out} holds a run with {k}={stored.get(k)!r}, not {current[k]!r}; use another --out to start a new run"
        )


def save_settings(out: Path, settings: T2ISettings) -> None:
    """Record the settings once the model and reward have loaded (a failed start leaves no claim on OUT)."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        path.write_text(json.dumps(_settings_json(settings), indent=2) + "\n")


def _settings_json(settings: T2ISettings) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(settings)))  # normalised as it reads back from the file


def load_done(metrics: Path) -> set[tuple[int, str]]:
    """(index, prompt) of the prompts already recorded; drops a half-written last line."""
    if not metrics.is_file():
        return set()
    raw = metrics.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1]:  # interrupted mid-line: cut back to the last complete record
        metrics.write_bytes(raw[: len(raw) - len(lines[-1])])
    done = set()
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add((int(record["index"]), str(record["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RunnerError(f"{metrics}: line {number} is not a metrics record ({exc})") from exc
    return done


# --- the run -----------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(model: str, dtype: str, device: str) -> Any:
    diffusers = require("diffusers", "diffusers")
    # float32 is the default; `torch_dtype` is the name every diffusers version accepts
    kwargs = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunnerError(f"could not load pipeline {model!r}: {first_line}") from exc
    return pipe.to(device)


def run_t2i(
    settings: T2ISettings,
    prompts_file: Path,
    out: Path,
    batch_size: Optional[int] = None,
    device: str = "auto",
    show_progress: bool = True,
) -> Path:
    """Run every prompt not yet in ``out/metrics.jsonl``; returns that file's path."""
    prompts = read_prompts(prompts_file)
    if settings.reward not in REWARDS:
        raise RunnerError(f"unknown reward {settings.reward!r}; expected one of {', '.join(REWARDS)}")
    if settings.dtype not in DTYPES:
        raise RunnerError(f"unknown dtype {settings.dtype!r}; expected one of {', '.join(DTYPES)}")
    # validate the method and its options before anything slow is loaded
    make_config(settings.method, n_particles=settings.particles, num_steps=settings.steps, seed=settings.seed,
                batch_size=batch_size, **settings.options)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    metrics = out / METRICS_FILE
    done = load_done(metrics)
    todo = [(i, p) for i, p in enumerate(prompts) if (i, p) not in done]
    if not todo:
        return metrics

    device = resolve_device(device)
    reward = REWARDS[settings.reward](settings.reward_model, device)
    pipe = load_pipeline(settings.model, settings.dtype, device)
    save_settings(out, settings)
    with metrics.open("a", encoding="utf-8") as sink:
        for index, prompt in tqdm(todo, desc="prompts", initial=len(prompts) - len(todo), total=len(prompts),
                                  disable=not show_progress):
            seed = settings.seed + index
            aligned = align(pipe, prompt, reward, method=settings.method, n_particles=settings.particles,
                            num_inference_steps=settings.steps, seed=seed, guidance_scale=settings.guidance,
                            batch_size=batch_size, **settings.options)
            image_dir = out / "images" / f"{index:04d}"
            image_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for rank, image in enumerate(aligned.images):
                image.save(image_dir / f"{rank:02d}.png")
                paths.append(str((image_dir / f"{rank:02d}.png").relative_to(out)))
            record = {"index": index, "prompt": prompt, "seed": seed, "device": device, **aligned.result.summary(),
                      "rewards": aligned.rewards.tolist(), "images": paths}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    return metrics
