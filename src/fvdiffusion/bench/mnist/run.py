"""Run (or resume) the benchmark: the tuning cells on seed 0, the tuned choice, the reported cells.

Every finished cell is appended to ``results.jsonl`` at once, keyed by (class, seed, resolved
config), so a rerun skips it and two labels with the same resolved config (e.g. a tuned setting
equal to the defaults) share a cell. Cells run in order — tuning first, then seed-major blocks
of (seed, class) with every row — so an interrupted run leaves whole blocks; tuned rows join
their blocks as soon as the tuning cells are all in. With ``workers`` > 1 the cells run in that
many processes; the parent alone writes the file.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.mnist.cells import SamplingModels, run_cell, without_images
from fvdiffusion.bench.mnist.config import MnistBenchConfig
from fvdiffusion.bench.mnist.methods import (
    SMC_FAMILIES, PlannedMethod, describe, estimated_calls, plan, resolved, tuned_label, tuning_points,
)
from fvdiffusion.durable import RecordLog

KEY_FIELDS = ("class", "seed", "resolved")
# The choice rule reads only these spaces; every other installed space (the held-out "mlp"
# classifier features) judges the reported seeds without ever having fed a choice.
TUNING_SPACES = ("ae", "evalnet")
# A grid point may spend at most this many denoiser calls per N·K (Langevin rebirth pays extra).
MAX_TUNING_CALL_RATIO = 1.25
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class CellTask:
    spec: MethodSpec
    cls: int
    seed: int
    tuning: bool
    order: tuple                          # position in the run: tuning first, then (seed, class, plan row)
    planned: PlannedMethod | None = None  # the reported row it fills (None for a tuning cell)


@dataclass(frozen=True)
class TuningScore:
    """A grid point's mean FID per space over the tuning classes, and its worst-case ratio to the
    family's best (the choice rule: the point whose worst ratio over spaces is smallest)."""

    family: str
    label: str
    options: dict[str, Any]
    fid: dict[str, float] | None
    worst_ratio: float | None
    chosen: bool


@dataclass
class BenchOutcome:
    """What the report needs: the plan (with tuned rows), labelled rows, and the tuning choice."""

    plan: list[PlannedMethod]
    rows: list[dict[str, Any]]
    tuning: list[TuningScore]
    strongest_smc: str | None     # the tuned SMC-family row that scored best on seed 0


def _worst_ratio_choice(fids: list[dict[str, float]]) -> tuple[list[float], int]:
    """Per candidate, max over spaces of FID / the best FID in that space; the index of the smallest."""
    spaces = fids[0].keys()
    best = {s: min(f[s] for f in fids) for s in spaces}
    ratios = [max(f[s] / best[s] if best[s] > 0 else float("inf") for s in spaces) for f in fids]
    return ratios, min(range(len(fids)), key=lambda i: ratios[i])  # ties: the earlier (closer to the defaults)


def _call_ratio(row: dict[str, Any], cfg: MnistBenchConfig) -> float:
    """Denoiser calls per population over N·K."""
    calls = row.get("denoiser_calls", 0)
    return calls / max(1, row.get("populations", 1)) / (cfg.n_particles * cfg.num_steps)


def choose_tuned(cfg: MnistBenchConfig, rows: dict[tuple, dict[str, Any]], score,
                 spaces: tuple[str, ...] = TUNING_SPACES) -> tuple[
        list[TuningScore], dict[str, MethodSpec], str | None]:
    """Tuning scores of every grid point; the chosen spec per family; the strongest tuned SMC family.

    A family whose grid is not complete gets no tuned row (e.g. a report from a partial file).
    """
    by_family: dict[str, list[tuple[MethodSpec, dict[str, float] | None]]] = {}
    for point in tuning_points(cfg):
        fids = []
        for cls in cfg.tuning_classes:
            row = rows.get((cls, TUNING_SEED, resolved(point.spec, TUNING_SEED, cfg, tuning=True)))
            fids.append({s: v for s, v in score(row).fid.items() if s in spaces} if row is not None else None)
            if row is not None and _call_ratio(row, cfg) > MAX_TUNING_CALL_RATIO:
                fids[-1] = {s: float("inf") for s in fids[-1]}  # over the call budget: never chosen
        mean = None
        if all(f is not None for f in fids):
            mean = {s: sum(f[s] for f in fids) / len(fids) for s in fids[0]}
        by_family.setdefault(point.family, []).append((point.spec, mean))
    scores, tuned, chosen_fid = [], {}, {}
    for family, points in by_family.items():
        complete = all(m is not None for _, m in points)
        ratios, best = _worst_ratio_choice([m for _, m in points]) if complete else ([None] * len(points), -1)
        for i, (spec, mean) in enumerate(points):
            scores.append(TuningScore(family, spec.label, spec.options, mean, ratios[i], i == best))
        if complete:
            spec = points[best][0]
            tuned[family] = MethodSpec(tuned_label(family), spec.method, dict(spec.options),
                                       f"best on tuning seed {TUNING_SEED}: {describe(spec.options)}")
            chosen_fid[family] = points[best][1]
    smc = [f for f in SMC_FAMILIES if f in chosen_fid]
    strongest = tuned_label(smc[_worst_ratio_choice([chosen_fid[f] for f in smc])[1]]) if smc else None
    return scores, tuned, strongest


# --- execution ------------------------------------------------------------------------------

_WORKER_MODELS: list[SamplingModels] = []


def _init_worker(device: str, threads: int | None) -> None:
    import torch

    _exit_with_parent()
    if threads is not None:
        torch.set_num_threads(threads)
    _WORKER_MODELS.append(SamplingModels(device))


def _exit_with_parent(every_seconds: float = 2.0) -> None:
    """A worker whose parent was killed (no clean shutdown) would finish its cell for nobody: end it."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_seconds)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_in_worker(task: CellTask, cfg: MnistBenchConfig) -> dict[str, Any]:
    return run_cell(_WORKER_MODELS[0], task.spec, task.cls, task.seed, cfg, task.tuning)


class _InlineExecutor:
    """The one-process path: runs a cell when it is submitted (models loaded on the first)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.models: SamplingModels | None = None

    def submit(self, task: CellTask, cfg: MnistBenchConfig) -> Future:
        if self.models is None:
            self.models = SamplingModels(self.device)
        future: Future = Future()
        future.set_result(run_cell(self.models, task.spec, task.cls, task.seed, cfg, task.tuning))
        return future

    def shutdown(self) -> None:
        pass


class _PoolExecutor:
    def __init__(self, cfg: MnistBenchConfig, threads: int | None) -> None:
        # spawn: a forked torch process can deadlock on its inherited thread pools
        self.pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(cfg.device, threads))

    def submit(self, task: CellTask, cfg: MnistBenchConfig) -> Future:
        return self.pool.submit(_run_in_worker, task, cfg)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Progress:
    """A tqdm bar weighted by estimated denoiser calls (so 'time left' means something)."""

    def __init__(self, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=1, desc="mnist", unit="call", unit_scale=True, disable=not enabled, smoothing=0.1)

    def add(self, calls: int) -> None:
        self.bar.total += calls
        self.bar.refresh()

    def done(self, calls: int, label: str) -> None:
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(calls)

    def close(self) -> None:
        self.bar.close()


def _tasks(cfg: MnistBenchConfig, planned: list[PlannedMethod], groups: set[str] | None) -> list[CellTask]:
    out = []
    for s, seed in enumerate(cfg.seeds):  # seed-major: an interrupted run leaves whole (seed, class) blocks
        for c, cls in enumerate(cfg.classes):
            for i, p in enumerate(planned):
                if groups is None or p.group in groups:
                    out.append(CellTask(p.spec, cls, seed, False, (1, s, c, i), p))
    return out


def run_mnist_bench(cfg: MnistBenchConfig, out_dir: Path, scorer=None, progress_bar: bool = True,
                    compute: bool = True, threads: int | None = None,
                    on_cell: Callable[[dict[str, Any]], None] | None = None,
                    tuning_only: bool = False) -> BenchOutcome:
    """Run (or resume) the benchmark and return its outcome.

    ``scorer`` (a ``scoring.Scorer``) scores each finished cell into its row and picks the tuned
    settings; it is needed when tuning or when ``store_images`` is off.
    ``compute=False`` only reads the file (cells not in it are left out). ``on_cell`` is called
    with each newly computed row after it is written. ``threads``: torch threads per worker
    process (default 1 when ``workers`` > 1).
    """
    if scorer is None and (cfg.tune or not cfg.store_images):
        raise ValueError("run_mnist_bench needs a scorer to tune or to keep rows without images")
    log = RecordLog(Path(out_dir) / RESULTS_FILE, KEY_FIELDS)
    done: dict[tuple, dict[str, Any]] = {log.key(r): r for r in log.rows}
    key = lambda t: (t.cls, t.seed, resolved(t.spec, t.seed, cfg, t.tuning))

    points = tuning_points(cfg)
    tuning_tasks = [CellTask(p.spec, cls, TUNING_SEED, True, (0, i, c))
                    for i, p in enumerate(points) for c, cls in enumerate(cfg.tuning_classes)]
    tuned: dict[str, MethodSpec] | None = None
    scores: list[TuningScore] = []
    strongest = None

    def resolve_tuning() -> bool:
        nonlocal tuned, scores, strongest
        if tuned is None and (compute is False or all(key(t) in done for t in tuning_tasks)):
            scores, tuned, strongest = choose_tuned(cfg, done, scorer.points) if points else ([], {}, None)
            return True
        return False

    provisional = plan(cfg)  # tuned rows join once the tuning is done
    pending = tuning_tasks + ([] if tuning_only else _tasks(cfg, provisional, None))
    progress = _Progress(progress_bar and compute)
    if resolve_tuning() and not tuning_only:
        pending += _tasks(cfg, plan(cfg, tuned), {"tuned"})
    pending.sort(key=lambda t: t.order)
    executor = None
    in_flight: dict[Future, CellTask] = {}
    running: set[tuple] = set()
    try:
        if compute:
            todo = [t for t in pending if key(t) not in done]
            progress.add(sum(estimated_calls(t.spec, cfg, t.tuning) for t in todo))
            if todo:
                executor = (_PoolExecutor(cfg, 1 if threads is None else threads) if cfg.workers > 1
                            else _InlineExecutor(cfg.device))
        while compute and (pending or in_flight):
            while pending and len(in_flight) < cfg.workers:
                task = pending.pop(0)
                if key(task) in done or key(task) in running:
                    continue
                running.add(key(task))
                in_flight[executor.submit(task, cfg)] = task
            if not in_flight:
                break
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in finished:
                task = in_flight.pop(future)
                row = future.result()
                if scorer is not None:  # scored now, so a row without images still reports
                    row["scores"] = scorer.record(row, task.tuning)
                if not cfg.store_images:
                    row = without_images(row)
                log.append(row)
                done[key(task)] = row
                running.discard(key(task))
                progress.done(estimated_calls(task.spec, cfg, task.tuning), f"{task.spec.label} c={task.cls} s={task.seed}")
                if on_cell is not None:
                    on_cell(row)
            if resolve_tuning() and not tuning_only:
                extra = _tasks(cfg, plan(cfg, tuned), {"tuned"})
                progress.add(sum(estimated_calls(t.spec, cfg) for t in extra if key(t) not in done))
                pending = sorted(pending + extra, key=lambda t: t.order)
        resolve_tuning()
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown()
    full_plan = plan(cfg, tuned)
    rows = []
    for task in _tasks(cfg, full_plan, None):
        row, p = done.get(key(task)), task.planned
        if row is not None:
            rows.append({**row, "label": p.spec.label, "family": p.family, "group": p.group, "budget": p.budget,
                         "note": p.spec.note})
    return BenchOutcome(full_plan, rows, scores, strongest)
