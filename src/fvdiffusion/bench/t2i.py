"""``fvd t2i``: align a diffusers text-to-image pipeline over a prompt file, resumably.

Reads a TXT file (one prompt per line) or a CSV with a ``Prompts`` column (DrawBench's
format). For prompt i it runs ``align()`` with seed ``seed + i``, writes the ranked images
to ``OUT/images/iiii/rr.png`` and appends one JSON line of metrics to ``OUT/metrics.jsonl``
once the images are on disk (a durable record file, :mod:`fvdiffusion.durable`: a torn last
line left by a crash is cut off and that prompt redone). Records are keyed by the prompt's
index *and text*: a rerun skips the prompts already recorded, and a prompt edited between
runs is recomputed, its stale record dropped from the file. ``OUT/run.json`` holds the run's
settings, and rerunning into the same directory with different settings is refused rather
than mixing two runs in one file.
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

from fvdiffusion.durable import RecordLog, fsync_file, write_atomically
from fvdiffusion.errors import CorruptRecordsError, PromptFileError, RunFileError, RunnerError
from fvdiffusion.integrations.diffusers import align
from fvdiffusion.jsonsafe import finite_or_none
from fvdiffusion.rewards import image_rewards, model_rewards
from fvdiffusion.rewards.model_rewards import require
from fvdiffusion.samplers import make_config

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "run.json"
DTYPES = ("float32", "float16", "bfloat16")


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
    "pickscore": lambda reward_model, device: model_rewards.PickScore(reward_model or model_rewards.DEFAULT_PICKSCORE,
                                                                      device=device),
}
# names that once were rewards: the message says why they are gone and what to use instead
REMOVED_REWARDS = {"imagereward": model_rewards.IMAGEREWARD_REMOVED}


# --- inputs ------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """Prompts from a TXT file (one per non-empty line) or a CSV with a ``Prompts`` column."""
    if not path.is_file():
        raise RunnerError(f"prompts file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptFileError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                              "save the prompt file as UTF-8") from None
    if path.suffix.lower() == ".csv":
        prompts = _csv_prompts(path, text)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RunnerError(f"{path.name}: no prompts found")
    return prompts


def _csv_prompts(path: Path, text: str) -> list[str]:
    # strict: an unterminated or stray quote is an error, never the rest of the file merged into one prompt
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # quoted prompts may hold newlines
    try:
        fieldnames = reader.fieldnames or []
    except csv.Error as exc:
        raise PromptFileError(f"{path}: line 1: bad CSV header ({exc})") from None
    if "Prompts" not in fieldnames:
        raise RunnerError(f"{path.name}: CSV has no 'Prompts' column (columns: {', '.join(fieldnames)})")
    prompts = []
    start = reader.line_num + 1  # the line the next record starts on
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise PromptFileError(f"{path}: line {start}: malformed CSV record ({exc}; an unterminated or "
                                  "stray '\"' in a quoted field?)") from None
        if (row["Prompts"] or "").strip():
            prompts.append(row["Prompts"].strip())
        start = reader.line_num + 1
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
    revision: Optional[str] = None  # hub commit / tag of the pipeline (None: the default branch)


def check_settings(out: Path, settings: T2ISettings) -> None:
    """Refuse to continue a run that was made with other settings."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    current = _settings_json(settings)
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(f"{path}: not a valid settings file ({exc}); restore it, or use another --out "
                           "to start a new run") from None
    if not isinstance(stored, dict):
        raise RunFileError(f"{path}: not a valid settings file (a JSON object expected); restore it, or use "
                           "another --out to start a new run")
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
        write_atomically(path, (json.dumps(_settings_json(settings), indent=2) + "\n").encode("utf-8"))


def _settings_json(settings: T2ISettings) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(settings)))  # normalised as it reads back from the file


def open_metrics(metrics: Path) -> RecordLog:
    """The run's records, keyed by (index, prompt text): an edited prompt is not done."""
    try:
        log = RecordLog(metrics, ("index", "prompt"))
    except CorruptRecordsError as exc:
        raise RunFileError(str(exc)) from None
    for number, record in enumerate(log.rows, start=1):
        if not isinstance(record.get("index"), int) or not isinstance(record.get("prompt"), str):
            raise RunFileError(f"{metrics}: record {number} is not a metrics record (no index or prompt)")
    return log


# --- the run -----------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(model: str, dtype: str, device: str, revision: Optional[str] = None) -> Any:
    """A diffusers pipeline from a local directory or a hub id, safetensors weights only.

    ``use_safetensors=True``: a pipeline that ships only pickled ``.bin`` weights is refused
    instead of unpickled (diffusers >= 0.31 applies this to every sub-model). ``revision``
    pins a hub id to a commit hash, branch or tag (ignored for a local directory).
    """
    diffusers = require("diffusers", "diffusers")
    # float32 is the default; `torch_dtype` is the name every diffusers version accepts
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype != "float32":
        kwargs["torch_dtype"] = getattr(torch, dtype)
    if revision is not None:
        kwargs["revision"] = revision
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunnerError(f"could not load pipeline {model!r} (safetensors weights only): {first_line}") from exc
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
    if settings.reward in REMOVED_REWARDS:
        raise RunnerError(f"--reward {settings.reward}: {REMOVED_REWARDS[settings.reward]}")
    if settings.reward not in REWARDS:
        raise RunnerError(f"unknown reward {settings.reward!r}; expected one of {', '.join(REWARDS)}")
    if settings.dtype not in DTYPES:
        raise RunnerError(f"unknown dtype {settings.dtype!r}; expected one of {', '.join(DTYPES)}")
    # validate the method and its options before anything slow is loaded
    make_config(settings.method, n_particles=settings.particles, num_steps=settings.steps, seed=settings.seed,
                batch_size=batch_size, **settings.options)
    if prompts:  # prompt i runs with seed + i: the last one must be a valid seed too
        make_config(settings.method, n_particles=settings.particles, num_steps=settings.steps,
                    seed=settings.seed + len(prompts) - 1, batch_size=batch_size, **settings.options)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    metrics = out / METRICS_FILE
    log = open_metrics(metrics)
    todo = [(i, p) for i, p in enumerate(prompts) if not log.done(index=i, prompt=p)]
    if not todo:
        return metrics

    device = resolve_device(device)
    reward = REWARDS[settings.reward](settings.reward_model, device)
    pipe = load_pipeline(settings.model, settings.dtype, device, revision=settings.revision)
    save_settings(out, settings)
    for index, prompt in tqdm(todo, desc="prompts", initial=len(prompts) - len(todo), total=len(prompts),
                              disable=not show_progress):
        seed = settings.seed + index
        aligned = align(pipe, prompt, reward, method=settings.method, n_particles=settings.particles,
                        num_inference_steps=settings.steps, seed=seed, guidance_scale=settings.guidance,
                        batch_size=batch_size, **settings.options)
        # a record of the prompt this index held before an edit would point at the images about
        # to be overwritten: drop it first (atomic rewrite), so no stale record survives a crash
        log.keep_where(lambda r: r["index"] != index or r["prompt"] == prompt)
        image_dir = out / "images" / f"{index:04d}"
        image_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for rank, image in enumerate(aligned.images):
            image.save(image_dir / f"{rank:02d}.png")
            fsync_file(image_dir / f"{rank:02d}.png")
            paths.append(str((image_dir / f"{rank:02d}.png").relative_to(out)))
        record = {"index": index, "prompt": prompt, "seed": seed, "device": device, **aligned.result.summary(),
                  "rewards": aligned.rewards.tolist(), "images": paths}
        log.append(finite_or_none(record))  # strict JSON (NaN -> null); one whole fsynced line: done only now
    return metrics
