"""``fvd t2i``: align a diffusers text-to-image pipeline over a prompt file, resumably.

Reads a TXT file (one prompt per line) or a CSV with a ``Prompts`` column (DrawBench's
format). For prompt i it runs ``align()`` with seed ``seed + i``, writes the ranked images
to ``OUT/images/iiii/rr.png`` and appends one JSON line of metrics to ``OUT/metrics.jsonl``
once the images are on disk (a durable record file, :mod:`fvdiffusion.durable`: a torn last
line left by a crash is cut off and that prompt redone). Records are keyed by the prompt's
index *and text*: a rerun skips the prompts already recorded, and a prompt edited between
runs is recomputed, its stale record dropped from the file. ``OUT/run.json`` holds the run's
settings, and once a prompt is recorded, rerunning into the same directory with different
settings is refused rather than mixing two runs in one file (before that, a retry replaces it).
Every reward is probed on the pipeline's image shape before anything is sampled
(:mod:`fvdiffusion.bench.t2i_rewards`).

``eval_reward`` scores the final images with a second reward that selection never sees;
``compare_base`` also runs ``method="base"`` from the same seed and writes a grid per prompt,
``OUT/grids/iiii.png`` (top row base, bottom row aligned, best reward first in each row).

Sharding: ``shard=(i, n)`` runs prompts i, i + n, i + 2n, ... and appends to its own record file
``OUT/metrics.shard-i-of-n.jsonl`` (n processes never write one file). A run without a shard
first merges every shard file's records into ``metrics.jsonl`` (those whose index and prompt
text match the prompt file), then runs what is still missing (``merge_only``: nothing) and
writes ``OUT/summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from fvdiffusion.durable import RecordLog, write_atomically
from fvdiffusion.errors import CorruptRecordsError, PromptFileError, RunFileError, RunnerError
from fvdiffusion.integrations.diffusers import align
from fvdiffusion.integrations.diffusers.align import to_pil
from fvdiffusion.bench.t2i_rewards import (  # noqa: F401  (REWARDS, REMOVED_REWARDS: the CLI's names)
    REMOVED_REWARDS, REWARDS, build_reward, check_reward_name, check_reward_paths, pipeline_image_shape,
    probe_reward,
)
from fvdiffusion.jsonsafe import finite_or_none
from fvdiffusion.rewards.model_rewards import require
from fvdiffusion.samplers import make_config

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "run.json"
SUMMARY_FILE = "summary.json"
SHARD_FILE = re.compile(r"^metrics\.shard-(\d+)-of-(\d+)\.jsonl$")
DTYPES = ("float32", "float16", "bfloat16")


# rewards by name: fvdiffusion.bench.t2i_rewards (REWARDS is re-exported for the CLI's name list)

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
    if fieldnames.count("Prompts") > 1:  # csv.DictReader would silently keep the last one
        raise PromptFileError(f"{path}: line 1: the CSV has {fieldnames.count('Prompts')} 'Prompts' columns; "
                              "keep one")
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
    guidance: Optional[float]  # None: the pipeline's own default (as align() and the pipeline use)
    dtype: str
    options: dict[str, Any] = field(default_factory=dict)
    revision: Optional[str] = None  # hub commit / tag of the pipeline (None: the default branch)
    negative_prompt: Optional[str] = None
    height: Optional[int] = None    # None: the pipeline's default size
    width: Optional[int] = None
    eval_reward: Optional[str] = None        # a second reward on the final images, never used for selection
    eval_reward_model: Optional[str] = None
    compare_base: bool = False               # also run method="base" from the same seed; a grid per prompt
    clip_model: Optional[str] = None         # aesthetic: its CLIP; pickscore: its processor (None: the default)
    eval_clip_model: Optional[str] = None


def shard_file(shard: tuple[int, int]) -> str:
    return f"metrics.shard-{shard[0]}-of-{shard[1]}.jsonl"


def check_settings(out: Path, settings: T2ISettings, has_records: bool = True) -> None:
    """Refuse to continue a run that was made with other settings. A run.json without a single
    record (a run that failed before its first prompt was done) binds nothing: its retry with
    other settings replaces it."""
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
    if not has_records:
        return  # a damaged file is still reported above; a readable one binds nothing yet
    # a field added since the run was started reads as its default (older run.json files stay valid)
    defaults = _settings_json(T2ISettings(**{f.name: "" for f in fields(T2ISettings) if f.default is MISSING
                                             and f.default_factory is MISSING}))
    changed = [k for k in current if stored.get(k, defaults.get(k)) != current[k]]
    if changed:
        k = changed[0]
        raise RunnerError(
            f"{out} holds a run with {k}={stored.get(k)!r}, not {current[k]!r}; use another --out to start a new run"
        )


def save_settings(out: Path, settings: T2ISettings, has_records: bool = True) -> None:
    """Record the settings once the model and reward have loaded and been probed (a run.json
    without records is replaced, see :func:`check_settings`)."""
    path = out / SETTINGS_FILE
    if not path.is_file() or not has_records:
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
        if isinstance(record["index"], bool) or record["index"] < 0:  # -1 would index the last prompt
            raise RunFileError(f"{metrics}: record {number} has index {record['index']!r}; prompt indices "
                               "start at 0")
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


def merge_shards(out: Path, prompts: list[str], log: RecordLog) -> int:
    """Copy into ``log`` every shard record of a current prompt that ``log`` lacks; returns how many."""
    merged = 0
    for path in sorted(p for p in out.iterdir() if SHARD_FILE.match(p.name)):
        for row in open_metrics(path).rows:
            index, prompt = row["index"], row["prompt"]
            if index >= len(prompts) or prompts[index] != prompt or log.done(index=index, prompt=prompt):
                continue  # a prompt no longer in the file (or edited), or already merged
            log.keep_where(lambda r: r["index"] != index or r["prompt"] == prompt)
            log.append(row)
            merged += 1
    return merged


def _mean(values: list[Any]) -> Optional[float]:
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(clean) / len(clean) if clean else None


def write_summary(out: Path, settings: T2ISettings, prompts: list[str], log: RecordLog) -> dict[str, Any]:
    """``OUT/summary.json``: per-run means over the recorded prompts, and which prompts are missing."""
    rows = {r["index"]: r for r in log.rows if r["index"] < len(prompts) and prompts[r["index"]] == r["prompt"]}
    done = [rows[i] for i in sorted(rows)]
    summary: dict[str, Any] = {
        "prompts": len(prompts), "done": len(done), "missing": [i for i in range(len(prompts)) if i not in rows],
        "method": settings.method, "reward": settings.reward,
        "mean_best_reward": _mean([r["rewards"][0] for r in done if r["rewards"]]),
        "mean_reward": _mean([_mean(r["rewards"]) for r in done]),
    }
    if settings.eval_reward is not None:
        summary["eval_reward"] = settings.eval_reward
        summary["mean_eval_reward_of_best"] = _mean([r["eval_rewards"][0] for r in done if r.get("eval_rewards")])
        summary["mean_eval_reward"] = _mean([_mean(r.get("eval_rewards") or []) for r in done])
    if settings.compare_base:
        summary["base_mean_best_reward"] = _mean([r["base_rewards"][0] for r in done if r.get("base_rewards")])
        summary["base_mean_reward"] = _mean([_mean(r.get("base_rewards") or []) for r in done])
        if settings.eval_reward is not None:
            summary["base_mean_eval_reward"] = _mean([_mean(r.get("base_eval_rewards") or []) for r in done])
    summary = finite_or_none(summary)
    write_atomically(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary


def save_grid(path: Path, rows: list[tuple[str, list[Any]]]) -> None:
    """One labelled row of images per (label, PIL images); written atomically."""
    image_module = require("PIL.Image", "plot")
    draw_module = require("PIL.ImageDraw", "plot")
    w, h = rows[0][1][0].size
    label_w, gap = 64, 2
    columns = max(len(images) for _, images in rows)
    grid = image_module.new("RGB", (label_w + columns * (w + gap), len(rows) * (h + gap)), "white")
    draw = draw_module.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (h + gap)
        draw.text((4, y + h // 2 - 5), label[:10], fill="black")
        for c, image in enumerate(images):
            grid.paste(image, (label_w + c * (w + gap), y))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())


def _save_images(out: Path, image_dir: Path, images: list[Any], prefix: str = "") -> list[str]:
    from fvdiffusion.bench.common.images import save_image

    paths = []
    for rank, image in enumerate(images):
        path = save_image(image, image_dir / f"{prefix}{rank:02d}.png")  # atomic and fsynced
        paths.append(str(path.relative_to(out)))
    return paths


def run_t2i(
    settings: T2ISettings,
    prompts_file: Optional[Path],
    out: Path,
    batch_size: Optional[int] = None,
    device: str = "auto",
    show_progress: bool = True,
    shard: Optional[tuple[int, int]] = None,
    merge_only: bool = False,
    populations: Optional[int] = None,
) -> Path:
    """Run every prompt not yet recorded (of this shard, if any); returns the record file's path.

    Without ``shard``, shard files in ``out`` are merged into ``metrics.jsonl`` first and
    ``summary.json`` is written at the end; ``merge_only`` merges and summarises without running.

    An unconditional pipeline (``DDPMPipeline`` / ``DDIMPipeline``) takes ``populations=K`` instead
    of a prompt file: K independent populations, prompt None, seeds seed + i (recorded with prompt "").
    """
    if (prompts_file is None) == (populations is None):
        raise RunnerError("give exactly one of --prompts FILE (text-to-image pipelines) and --populations K "
                          "(unconditional pipelines)")
    if populations is not None:
        if isinstance(populations, bool) or not isinstance(populations, int) or populations < 1:
            raise RunnerError(f"--populations must be an integer >= 1, got {populations!r}")
        prompts = [""] * populations
    else:
        prompts = read_prompts(prompts_file)
    check_reward_name("--reward", settings.reward)
    check_reward_paths("--reward", settings.reward, settings.reward_model, settings.clip_model,
                       "--reward-model", "--clip-model")
    if settings.eval_reward is not None:
        check_reward_name("--eval-reward", settings.eval_reward)
        check_reward_paths("--eval-reward", settings.eval_reward, settings.eval_reward_model,
                           settings.eval_clip_model, "--eval-reward-model", "--eval-clip-model")
    if settings.dtype not in DTYPES:
        raise RunnerError(f"unknown dtype {settings.dtype!r}; expected one of {', '.join(DTYPES)}")
    if shard is not None and not (isinstance(shard, tuple) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise RunnerError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if shard is not None and merge_only:
        raise RunnerError("--merge combines the shards' results: run it without --shard")
    # validate the method and its options before anything slow is loaded
    make_config(settings.method, n_particles=settings.particles, num_steps=settings.steps, seed=settings.seed,
                batch_size=batch_size, **settings.options)
    if prompts:  # prompt i runs with seed + i: the last one must be a valid seed too
        make_config(settings.method, n_particles=settings.particles, num_steps=settings.steps,
                    seed=settings.seed + len(prompts) - 1, batch_size=batch_size, **settings.options)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS_FILE
    has_records = _has_records(out)
    check_settings(out, settings, has_records)
    main_log = open_metrics(metrics)
    if shard is None:
        merge_shards(out, prompts, main_log)
        log = main_log
        todo = [(i, p) for i, p in enumerate(prompts) if not log.done(index=i, prompt=p)]
    else:
        log = open_metrics(out / shard_file(shard))
        todo = [(i, p) for i, p in enumerate(prompts) if i % shard[1] == shard[0]
                and not log.done(index=i, prompt=p) and not main_log.done(index=i, prompt=p)]
    if merge_only or not todo:
        if shard is None:
            write_summary(out, settings, prompts, main_log)
        return log.path

    device = resolve_device(device)
    reward = build_reward(settings.reward, settings.reward_model, settings.clip_model, device)
    eval_reward = (None if settings.eval_reward is None
                   else build_reward(settings.eval_reward, settings.eval_reward_model, settings.eval_clip_model, device))
    pipe = load_pipeline(settings.model, settings.dtype, device, revision=settings.revision)
    unconditional = _is_unconditional(pipe)
    if unconditional and populations is None:
        raise RunnerError(f"{type(pipe).__name__} is unconditional: it takes no prompts; use --populations K "
                          "instead of --prompts")
    if not unconditional and populations is not None:
        raise RunnerError(f"{type(pipe).__name__} is a text-to-image pipeline: use --prompts FILE, not --populations")
    if unconditional and settings.negative_prompt is not None:
        raise RunnerError(f"{type(pipe).__name__} is unconditional: --negative-prompt does not apply")
    scale = getattr(pipe, "vae_scale_factor", None)
    for name, value in (("--height", settings.height), ("--width", settings.width)):
        if value is not None and isinstance(scale, int) and value % scale:
            raise RunnerError(f"{name} {value}: must be a multiple of the pipeline's VAE scale factor {scale}")
    # every reward scores the pipeline's own image shape once, before any population is sampled
    shape = pipeline_image_shape(pipe, settings.height, settings.width)
    probe_prompt = None if unconditional else todo[0][1]
    probe_reward("--reward", settings.reward, reward, shape, device, probe_prompt)
    if eval_reward is not None:
        probe_reward("--eval-reward", settings.eval_reward, eval_reward, shape, device, probe_prompt)
    save_settings(out, settings, has_records)
    size = {"negative_prompt": settings.negative_prompt, "height": settings.height, "width": settings.width,
            "guidance_scale": None if unconditional else settings.guidance}
    total = len(prompts) if shard is None else len(range(shard[0], len(prompts), shard[1]))
    for index, prompt in tqdm(todo, desc="prompts", initial=total - len(todo), total=total,
                              disable=not show_progress):
        seed = settings.seed + index
        condition = None if unconditional else prompt
        aligned = align(pipe, condition, reward, method=settings.method, n_particles=settings.particles,
                        num_inference_steps=settings.steps, seed=seed,
                        batch_size=batch_size, output_type="pt", **size, **settings.options)
        base = None
        if settings.compare_base:  # the same seed: the same initial noise, no steering
            eta = {"eta": settings.options["eta"]} if "eta" in settings.options else {}
            base = align(pipe, condition, reward, method="base", n_particles=settings.particles,
                         num_inference_steps=settings.steps, seed=seed,
                         batch_size=batch_size, output_type="pt", **size, **eta)
        # a record of the prompt this index held before an edit would point at the images about
        # to be overwritten: drop it first (atomic rewrite), so no stale record survives a crash
        log.keep_where(lambda r: r["index"] != index or r["prompt"] == prompt)
        image_dir = out / "images" / f"{index:04d}"
        image_dir.mkdir(parents=True, exist_ok=True)
        images = to_pil(aligned.images)
        record = {"index": index, "prompt": prompt, "seed": seed, "device": device, **aligned.result.summary(),
                  "rewards": aligned.rewards.tolist(), "images": _save_images(out, image_dir, images)}
        if eval_reward is not None:  # scored after the run: selection never saw it
            record["eval_reward"] = settings.eval_reward
            record["eval_rewards"] = _score(eval_reward, aligned.images, condition)
        if base is not None:
            base_images = to_pil(base.images)
            record["base_rewards"] = base.rewards.tolist()
            record["base_images"] = _save_images(out, image_dir, base_images, prefix="base_")
            if eval_reward is not None:
                record["base_eval_rewards"] = _score(eval_reward, base.images, condition)
            grid = out / "grids" / f"{index:04d}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            save_grid(grid, [("base", base_images), (settings.method, images)])
            record["grid"] = str(grid.relative_to(out))
        log.append(finite_or_none(record))  # strict JSON (NaN -> null); one whole fsynced line: done only now
    if shard is None:
        write_summary(out, settings, prompts, main_log)
    return log.path


def _has_records(out: Path) -> bool:
    """Whether any prompt of this run is done (in metrics.jsonl or a shard file): only then does run.json bind."""
    files = [out / METRICS_FILE, *(p for p in out.iterdir() if SHARD_FILE.match(p.name))]
    return any(path.is_file() and path.stat().st_size > 0 for path in files)


def _is_unconditional(pipe: Any) -> bool:
    from fvdiffusion.integrations.diffusers.pipelines import SUPPORTED_PIPELINES

    return SUPPORTED_PIPELINES.get(type(pipe).__name__) == "pixel"


def _score(reward: Any, images: torch.Tensor, prompt: Optional[str]) -> list[float]:
    with torch.no_grad():
        return [float(v) for v in reward(images, prompt)]
