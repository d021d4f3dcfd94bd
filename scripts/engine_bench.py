"""Engine micro-benchmarks (issue 11, item 5): what the particle engine costs on top of the model.

    OMP_NUM_THREADS=1 python scripts/engine_bench.py              # full CPU run -> benchmarks/engine/
    OMP_NUM_THREADS=1 python scripts/engine_bench.py --quick      # CPU smoke run (~1 min) -> runs/engine_bench_quick/
    python scripts/engine_bench.py --device cuda --out $OUT/engine   # on a GPU box

Three parts (``--parts ratio,overhead,profile``, all by default):

a. ``ratio``: FVD / base wall time at equal N and K on MNIST with the shipped DDPM UNet and
   the class reward log p(c | x) of the shipped classifier (N = 64, K = 20, class 2). Runs
   alternate in ABBA order (pair i runs base first when i is even, fvd first when odd), one
   untimed warm-up of each first; reported: the median ratio over the pairs and its min-max.
   Target <= 1.05.
b. ``overhead``: wall seconds per particle-step, wall / (N K), against N (16 ... 16384) on
   the exact 2-D Gaussian-mixture toy (``gmm2d-component``) for base, fvd and smc, with a
   closed-form denoiser and reward that do a few elementwise ops per particle and never
   synchronise (so the engine dominates); medians over repeats, and the overhead of fvd and
   smc over base per particle-step. On a CPU the time spent inside the denoiser and reward is
   also measured, so wall minus it is the engine's own time. Flat across N is the target.
c. ``profile``: torch.profiler over one MNIST FVD run (after a warm-up run), CPU and, on
   CUDA, the device too. Each op that forces a host synchronisation on an accelerator
   (``aten::_local_scalar_dense`` = item/bool/int/float of a tensor, ``aten::nonzero``,
   ``aten::unique*``, ``aten::masked_select``, ``aten::repeat_interleave``; on CUDA also
   cuda*Synchronize calls and device-to-host copies) is counted per step: a step runs from
   the start of one denoiser call to the start of the next; events inside the denoiser or
   the reward (``record_function`` ranges around each call) are counted apart from the
   engine's. Also the top ops by self time. The progress bar is off.

Every measurement is one row of OUT/results.jsonl, written (and fsynced) as soon as it is
taken: rerunning the same command skips what is there and finishes the rest. After the
engine changes, start again with ``--fresh`` (or another ``--out``). OUT/results.md (with
the exact command at the top) and OUT/engine.png are rewritten from the rows at the end;
``--report-only`` rewrites them without measuring.

Only the public API is used (``fvdiffusion.sample``), so the script runs unchanged against
any engine that keeps it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
# the engine measured is the one of this checkout (also without `pip install -e .`, e.g. on a GPU box)
if (REPO / "src" / "fvdiffusion").is_dir() and str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
import fvdiffusion as fv  # noqa: E402

from fvdiffusion.checks import force_eager  # noqa: E402
from fvdiffusion.durable import RecordLog, write_atomically  # noqa: E402
from fvdiffusion.schedule import VPSchedule  # noqa: E402

PARTS = ("ratio", "overhead", "profile")
TOY_METHODS = ("base", "fvd", "smc")
RESULTS = "results.jsonl"
KEY_FIELDS = ("part", "device", "threads", "problem", "n_particles", "num_steps", "method", "repeat")
DENOISER_RANGE = "engine_bench::denoiser"
REWARD_RANGE = "engine_bench::reward"
RUN_RANGE = "engine_bench::run"
RATIO_TARGET = 1.05
TOP_OPS = 15


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the three parts. ``quick()`` is a CPU smoke run of every code path."""

    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    mnist_class: int = 2
    mnist_particles: int = 64
    mnist_steps: int = 20
    pairs: int = 5
    toy_problem: str = "gmm2d-component"
    toy_particles: tuple[int, ...] = (16, 64, 256, 1024, 4096, 16384)
    toy_steps: int = 20
    repeats: int = 5
    profile_particles: int = 64
    profile_steps: int = 20
    parts: tuple[str, ...] = field(default=PARTS)

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        sizes = dict(mnist_particles=16, mnist_steps=4, pairs=2, toy_particles=(16, 256, 4096), toy_steps=5,
                     repeats=2, profile_particles=16, profile_steps=4)
        return cls(**{**sizes, **overrides})

    @property
    def mnist_problem(self) -> str:
        return f"mnist-class{self.mnist_class}"


# --- environment ------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def environment(device: str) -> dict[str, Any]:
    """Where the numbers come from: machine, torch, device, threads, engine commit."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    package = Path(fv.__file__).resolve().parent
    try:
        package = package.relative_to(REPO)
    except ValueError:
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "fvdiffusion": str(package)}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        env["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine makes timings noisy
    except (OSError, AttributeError):
        pass
    env["git"] = _git_state()
    return env


def _git_state() -> str:
    """``<commit>`` of the engine's checkout, ``+dirty`` if src/fvdiffusion has uncommitted changes."""
    src = Path(fv.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def timed_sample(method: str, denoiser: Any, reward: Any, n: int, k: int, seed: int, device: str,
                 **options: Any) -> tuple[float, Any]:
    """Wall seconds of one ``fvdiffusion.sample`` call (device work included) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fv.sample(method, denoiser, reward, n_particles=n, num_steps=k, seed=seed, progress=False, **options)
    synchronize(device)
    return time.perf_counter() - start, result


class _TimedReward:
    """Forwards to a reward and sums the wall time spent inside its calls (device work included)."""

    def __init__(self, inner: Any, device: str) -> None:
        self._inner, self._device, self.seconds = inner, device, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self._device)
        start = time.perf_counter()
        out = self._inner(*args, **kwargs)
        synchronize(self._device)
        self.seconds += time.perf_counter() - start
        return out


def _cost(result: Any, name: str) -> Any:
    return getattr(getattr(result, "cost", None), name, None)


# --- the toy: an exact 2-D mixture denoiser cheap enough that the engine dominates ---------------

_LOG_2PI = math.log(2 * math.pi)


class CheapMixture:
    """Closed-form E[x0 | x_t] and log p(k | x) of a 2-D Gaussian mixture, batched over rows.

    The same values as ``GaussianMixtureDenoiser`` / ``ComponentPosteriorReward`` (tested), but
    a few elementwise ops per particle on any device and no host synchronisation (the
    library's exact denoiser checks its inputs and groups rows by timestep, which syncs).
    Time spent in calls is accumulated in ``seconds`` when ``timed`` (a CPU: exact without a sync).
    """

    def __init__(self, mixture: Any, device: str = "cpu", timed: bool = False) -> None:
        if mixture.dim != 2:
            raise ValueError(f"CheapMixture is for 2-D mixtures, got dim {mixture.dim}")
        self.device = torch.device(device)
        self._params = {name: getattr(mixture, name).to(self.device, torch.float64)
                        for name in ("weights", "means", "covs")}
        self._cast: dict[torch.dtype, dict[str, torch.Tensor]] = {}
        self.timed = timed
        self.seconds = 0.0
        self.rows = 0

    def params(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if dtype not in self._cast:
            p = {k: v.to(dtype) for k, v in self._params.items()}
            p["log_w"] = p.pop("weights").log()
            self._cast[dtype] = p
        return self._cast[dtype]

    def terms(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log joint [B, K] of x under the noised mixture at ᾱ = a [B], C_k⁻¹ r [B, K, 2] and √a [B, 1, 1]."""
        p = self.params(x.dtype)
        a = a.to(x.dtype)
        sa = a.sqrt()[:, None, None]
        r = x[:, None, :] - sa * p["means"][None]                           # x - √a μ_k
        a4 = a[:, None, None, None]
        c = a4 * p["covs"][None] + (1 - a4) * torch.eye(2, dtype=x.dtype, device=x.device)
        c00, c01, c10, c11 = c[..., 0, 0], c[..., 0, 1], c[..., 1, 0], c[..., 1, 1]
        det = c00 * c11 - c01 * c10
        y = torch.stack([c11 * r[..., 0] - c01 * r[..., 1], c00 * r[..., 1] - c10 * r[..., 0]], -1) / det[..., None]
        log_joint = p["log_w"] + (-0.5 * (r * y).sum(-1) - 0.5 * det.log() - _LOG_2PI)
        return log_joint, y, sa

    def posterior_mean(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        log_joint, y, sa = self.terms(x, a)
        p = self.params(x.dtype)
        cond = p["means"][None] + sa * (p["covs"][None] @ y[..., None]).squeeze(-1)   # E[x0 | x_t, k]
        return (torch.softmax(log_joint, -1)[..., None] * cond).sum(1)

    def log_posterior(self, x: torch.Tensor, component: int) -> torch.Tensor:
        log_joint, _, _ = self.terms(x, torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
        return torch.log_softmax(log_joint, -1)[:, component]

    def clock(self, fn: Callable[[], torch.Tensor], rows: int) -> torch.Tensor:
        if not self.timed:
            self.rows += rows
            return fn()
        start = time.perf_counter()
        out = fn()
        self.seconds += time.perf_counter() - start
        self.rows += rows
        return out


class CheapMixtureDenoiser:
    """x0-predicting exact denoiser of a 2-D mixture under ``schedule`` (a Denoiser)."""

    prediction_type = "x0"

    def __init__(self, mixture: Any, schedule: VPSchedule, device: str = "cpu", timed: bool = False) -> None:
        self.core = CheapMixture(mixture, device, timed)
        self.schedule = schedule
        self.sample_shape = (2,)
        self.device = self.core.device
        self._alpha_bars = schedule.alphas_cumprod.to(self.device, torch.float64)

    def __call__(self, x_t: torch.Tensor, t: Any, cond: Any = None) -> torch.Tensor:
        def run() -> torch.Tensor:
            steps = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
            a = torch.where(steps >= 0, self._alpha_bars[steps.clamp(min=0)], torch.ones_like(self._alpha_bars[0]))
            return self.core.posterior_mean(x_t, a)
        return self.core.clock(run, x_t.shape[0])


class CheapComponentReward:
    """r(x) = log p(component | x) under the clean mixture (a Reward)."""

    def __init__(self, mixture: Any, component: int, device: str = "cpu", timed: bool = False) -> None:
        self.core = CheapMixture(mixture, device, timed)
        self.component = component
        self.name = f"component_log_posterior[{component}]"

    def __call__(self, x0: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.core.clock(lambda: self.core.log_posterior(x0, self.component), x0.shape[0])


def toy_models(cfg: BenchConfig) -> tuple[CheapMixtureDenoiser, CheapComponentReward, float]:
    from fvdiffusion.testbeds import toy_problem

    problem = toy_problem(cfg.toy_problem)
    if problem.target_component is None:
        raise ValueError(f"--toy-problem must be a '-component' problem, got {cfg.toy_problem!r}")
    timed = not cfg.device.startswith("cuda")  # on a device, timing each call would need a sync
    denoiser = CheapMixtureDenoiser(problem.mixture, VPSchedule.linear(1000), cfg.device, timed)
    reward = CheapComponentReward(problem.mixture, problem.target_component, cfg.device, timed)
    return denoiser, reward, problem.lam


# --- the MNIST models ---------------------------------------------------------------------------

def mnist_models(cfg: BenchConfig) -> tuple[Any, Any]:
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier

    denoiser = load_ddpm(device=cfg.device)
    reward = ClassifierReward(load_reward_classifier(device=cfg.device), cfg.mnist_class)
    return denoiser, reward


# --- rows ---------------------------------------------------------------------------------------

def _key(cfg: BenchConfig, part: str, problem: str, n: int, k: int, method: str, repeat: int) -> dict[str, Any]:
    return {"part": part, "device": cfg.device, "threads": cfg.threads, "problem": problem, "n_particles": n,
            "num_steps": k, "method": method, "repeat": repeat}


def _say(text: str) -> None:
    print(text, flush=True)


# --- a. FVD / base wall-time ratio on MNIST -------------------------------------------------------

def run_ratio(cfg: BenchConfig, log: RecordLog, env: dict[str, Any], models: tuple[Any, Any] | None = None,
              say: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    """Timed base and fvd runs in ABBA-alternated pairs; rows are appended to ``log`` as they are taken."""
    n, k = cfg.mnist_particles, cfg.mnist_steps
    todo = [(pair, method) for pair in range(cfg.pairs)
            for method in (("base", "fvd") if pair % 2 == 0 else ("fvd", "base"))]
    todo = [(p, m) for p, m in todo if not log.done(**_key(cfg, "ratio", cfg.mnist_problem, n, k, m, p))]
    new: list[dict[str, Any]] = []
    if not todo:
        return new
    denoiser, reward = models or mnist_models(cfg)
    for method in ("base", "fvd"):  # warm-up (lazy initialisation, allocator, caches): not recorded
        timed_sample(method, denoiser, reward, n, k, cfg.seed + 10_000, cfg.device)
    for pair, method in todo:
        timed_reward = _TimedReward(reward, cfg.device)
        wall, result = timed_sample(method, denoiser, timed_reward, n, k, cfg.seed + pair, cfg.device)
        row = {**_key(cfg, "ratio", cfg.mnist_problem, n, k, method, pair),
               "position": 0 if (method == "base") == (pair % 2 == 0) else 1, "seed": cfg.seed + pair,
               "wall_seconds": wall, "reward_seconds": timed_reward.seconds,
               "seconds_per_particle_step": wall / (n * k),
               "denoiser_calls": _cost(result, "denoiser_calls"), "reward_calls": _cost(result, "reward_calls"),
               "git": env["git"], "torch": env["torch"]}
        log.append(row)
        new.append(row)
        say(f"ratio pair {pair} {method}: {wall:.3f} s")
    return new


# --- b. engine overhead per particle-step against N on the toy -----------------------------------

def run_overhead(cfg: BenchConfig, log: RecordLog, env: dict[str, Any],
                 say: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    """base / fvd / smc at every N, ``repeats`` times (the method order rotates); rows appended as taken."""
    k = cfg.toy_steps
    denoiser, reward, lam = toy_models(cfg)
    warmed: set[tuple[int, str]] = set()
    new: list[dict[str, Any]] = []
    for repeat in range(cfg.repeats):
        for i, n in enumerate(cfg.toy_particles):
            shift = (repeat + i) % len(TOY_METHODS)
            for method in TOY_METHODS[shift:] + TOY_METHODS[:shift]:
                key = _key(cfg, "overhead", cfg.toy_problem, n, k, method, repeat)
                if log.done(**key):
                    continue
                if (n, method) not in warmed:
                    timed_sample(method, denoiser, reward, n, k, cfg.seed + 10_000, cfg.device, lam=lam)
                    warmed.add((n, method))
                for model in (denoiser.core, reward.core):
                    model.seconds, model.rows = 0.0, 0
                wall, result = timed_sample(method, denoiser, reward, n, k, cfg.seed + repeat, cfg.device, lam=lam)
                model_seconds = denoiser.core.seconds + reward.core.seconds if denoiser.core.timed else None
                row = {**key, "seed": cfg.seed + repeat, "wall_seconds": wall,
                       "seconds_per_particle_step": wall / (n * k),
                       "model_seconds": model_seconds,
                       "engine_seconds_per_particle_step": (None if model_seconds is None
                                                            else (wall - model_seconds) / (n * k)),
                       "denoiser_rows": denoiser.core.rows, "reward_rows": reward.core.rows,
                       "denoiser_calls": _cost(result, "denoiser_calls"), "reward_calls": _cost(result, "reward_calls"),
                       "git": env["git"], "torch": env["torch"]}
                log.append(row)
                new.append(row)
                say(f"overhead repeat {repeat} N={n} {method}: {wall:.4f} s "
                    f"({row['seconds_per_particle_step'] * 1e6:.3f} us per particle-step)")
    return new


# --- c. host synchronisations per step in one profiled run ----------------------------------------

def _is_local_scalar(name: str) -> bool:
    return name == "aten::_local_scalar_dense"


SYNC_OPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("aten::_local_scalar_dense (item/bool/int/float)", _is_local_scalar),
    ("aten::nonzero", lambda name: name.startswith("aten::nonzero")),
    ("aten::unique*", lambda name: name.startswith(("aten::unique", "aten::_unique"))),
    ("aten::masked_select", lambda name: name == "aten::masked_select"),
    ("aten::repeat_interleave", lambda name: name == "aten::repeat_interleave"),
)
CUDA_SYNC_OPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("cuda*Synchronize", lambda name: name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                "cudaEventSynchronize")),
    ("Memcpy DtoH / cudaMemcpy D2H", lambda name: "DtoH" in name or "D2H" in name),
)
OUTERMOST = "sync points (outermost of the aten ops above)"


class _Ranged:
    """Forwards to a denoiser or reward inside a ``record_function`` range (attributes pass through)."""

    def __init__(self, inner: Any, label: str) -> None:
        self._inner = inner
        self._label = label
        for name in ("schedule", "prediction_type", "sample_shape"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.profiler import record_function

        with record_function(self._label):
            return self._inner(*args, **kwargs)


def _interval(event: Any) -> tuple[float, float]:
    return float(event.time_range.start), float(event.time_range.end)


def _inside(intervals: list[tuple[float, float]], starts: list[float], t: float) -> bool:
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and intervals[i][0] <= t <= intervals[i][1]


def profile_run(method: str, denoiser: Any, reward: Any, n: int, k: int, seed: int, device: str,
                **options: Any) -> dict[str, Any]:
    """Profile one run (after an unprofiled warm-up) and count the host-sync ops per step.

    Returns counts per category for the engine (outside the denoiser and reward calls) per
    bucket: bucket 0 is before the first denoiser call, bucket i (1 ... calls) runs from the
    start of call i to the start of call i+1 (the last one to the end of the run); and the
    totals inside denoiser and reward calls. Also the top ops by self time, whole run and
    engine only.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    timed_sample(method, denoiser, reward, n, k, seed, device, **options)  # warm-up
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    ranged_denoiser, ranged_reward = _Ranged(denoiser, DENOISER_RANGE), _Ranged(reward, REWARD_RANGE)
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        with record_function(RUN_RANGE):
            fv.sample(method, ranged_denoiser, ranged_reward, n_particles=n, num_steps=k, seed=seed,
                      progress=False, **options)
        synchronize(device)
    wall = time.perf_counter() - start
    events = list(prof.events())
    summary = count_sync_ops(events, on_cuda)
    summary.update(profiled_wall_seconds=wall, top_ops=_top_ops(prof.key_averages(), on_cuda),
                   top_engine_ops=_top_engine_ops(events))
    return summary


def _ranges(events: list[Any], label: str) -> list[tuple[float, float]]:
    return sorted(_interval(e) for e in events if e.name == label)


def count_sync_ops(events: list[Any], on_cuda: bool = False) -> dict[str, Any]:
    """Per-step counts of host-sync ops in a profiled run (see :func:`profile_run`)."""
    run = _ranges(events, RUN_RANGE)
    calls = _ranges(events, DENOISER_RANGE)
    rewards = _ranges(events, REWARD_RANGE)
    if not run or not calls:
        raise ValueError("the profile holds no engine_bench::run range or no denoiser call")
    run_start, run_end = run[0]
    call_starts = [s for s, _ in calls]
    reward_starts = [s for s, _ in rewards]
    categories = list(SYNC_OPS) + (list(CUDA_SYNC_OPS) if on_cuda else [])
    names = [name for name, _ in categories] + [OUTERMOST]
    engine = {name: [0] * (len(calls) + 1) for name in names}
    model = {name: 0 for name in names}
    in_reward = {name: 0 for name in names}
    aten_names = {name for name, _ in SYNC_OPS}

    def category(event: Any) -> str | None:
        for name, match in categories:
            if match(event.name):
                return name
        return None

    def has_counted_ancestor(event: Any) -> bool:
        parent = getattr(event, "cpu_parent", None)
        while parent is not None:
            if category(parent) in aten_names:
                return True
            parent = getattr(parent, "cpu_parent", None)
        return False

    for event in events:
        name = category(event)
        if name is None:
            continue
        t = _interval(event)[0]
        if not run_start <= t <= run_end:
            continue
        labels = [name] + ([OUTERMOST] if name in aten_names and not has_counted_ancestor(event) else [])
        for label in labels:
            if _inside(calls, call_starts, t):
                model[label] += 1
            elif rewards and _inside(rewards, reward_starts, t):
                in_reward[label] += 1
            else:
                engine[label][bisect.bisect_right(call_starts, t)] += 1
    return {"categories": names, "denoiser_calls_profiled": len(calls), "reward_calls_profiled": len(rewards),
            "engine_counts": engine, "denoiser_counts": model, "reward_counts": in_reward}


def _self_device_us(avg: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(avg, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _top_ops(averages: Iterable[Any], on_cuda: bool) -> list[dict[str, Any]]:
    rows = [{"name": a.key, "calls": int(a.count), "self_cpu_ms": float(a.self_cpu_time_total) / 1e3,
             **({"self_device_ms": _self_device_us(a) / 1e3} if on_cuda else {})} for a in averages]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    return rows[:TOP_OPS]


def _top_engine_ops(events: list[Any]) -> list[dict[str, Any]]:
    """Self CPU time by op name outside the denoiser and reward calls, inside the run."""
    run = _ranges(events, RUN_RANGE)
    calls = _ranges(events, DENOISER_RANGE) + _ranges(events, REWARD_RANGE)
    calls.sort()
    starts = [s for s, _ in calls]
    run_start, run_end = run[0]
    totals: dict[str, list[float]] = {}
    for event in events:
        if getattr(event, "device_type", None) is not None and "CPU" not in str(event.device_type):
            continue
        if event.name in (DENOISER_RANGE, REWARD_RANGE):
            continue
        t = _interval(event)[0]
        if not run_start <= t <= run_end or _inside(calls, starts, t):
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += float(event.self_cpu_time_total)
    rows = [{"name": name, "calls": c, "self_cpu_ms": us / 1e3} for name, (c, us) in totals.items()]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    return rows[:TOP_OPS]


def run_profile(cfg: BenchConfig, log: RecordLog, env: dict[str, Any], models: tuple[Any, Any] | None = None,
                say: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    n, k = cfg.profile_particles, cfg.profile_steps
    new = []
    for label in profile_labels(cfg.device):
        key = _key(cfg, "profile", cfg.mnist_problem, n, k, label, 0)
        if log.done(**key):
            continue
        denoiser, reward = models or mnist_models(cfg)
        models = (denoiser, reward)
        with force_eager(False) if label == ACCELERATOR_PATH else contextlib.nullcontext():
            summary = profile_run("fvd", denoiser, reward, n, k, cfg.seed, cfg.device)
        row = {**key, "seed": cfg.seed, **summary, "git": env["git"], "torch": env["torch"]}
        log.append(row)
        new.append(row)
        say(f"profile {label} N={n} K={k}: {summary['profiled_wall_seconds']:.2f} s profiled")
    return new


ACCELERATOR_PATH = "fvd (accelerator code path)"


def profile_labels(device: str) -> tuple[str, ...]:
    """The runs part c profiles: the device's own path, and on the CPU also the accelerator's
    (checks deferred, gathers out of place: what a GPU runs), forced with force_eager(False)."""
    return ("fvd",) if device.startswith("cuda") else ("fvd", ACCELERATOR_PATH)


# --- the report ---------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def select_rows(rows: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """The rows of this configuration, by part (a file may also hold other sizes or devices)."""
    def ours(r: dict[str, Any]) -> bool:
        return r.get("device") == cfg.device and r.get("threads") == cfg.threads

    return {
        "ratio": [r for r in rows if r.get("part") == "ratio" and ours(r) and r["problem"] == cfg.mnist_problem
                  and r["n_particles"] == cfg.mnist_particles and r["num_steps"] == cfg.mnist_steps
                  and r["repeat"] < cfg.pairs],
        "overhead": [r for r in rows if r.get("part") == "overhead" and ours(r) and r["problem"] == cfg.toy_problem
                     and r["n_particles"] in cfg.toy_particles and r["num_steps"] == cfg.toy_steps
                     and r["repeat"] < cfg.repeats],
        "profile": [r for r in rows if r.get("part") == "profile" and ours(r) and r["problem"] == cfg.mnist_problem
                    and r["n_particles"] == cfg.profile_particles and r["num_steps"] == cfg.profile_steps],
    }


def ratio_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    by_pair: dict[int, dict[str, float]] = {}
    for r in rows:
        by_pair.setdefault(r["repeat"], {})[r["method"]] = r["wall_seconds"]
    pairs = {p: m for p, m in sorted(by_pair.items()) if "base" in m and "fvd" in m}
    if not pairs:
        return None
    ratios = [m["fvd"] / m["base"] for m in pairs.values()]
    # the same ratio without the time inside reward calls: denoising plus the engine's own work
    without: dict[int, dict[str, float]] = {}
    for r in rows:
        if "reward_seconds" in r and r["repeat"] in pairs:
            without.setdefault(r["repeat"], {})[r["method"]] = r["wall_seconds"] - r["reward_seconds"]
    engine_ratios = [m["fvd"] / m["base"] for m in without.values() if "base" in m and "fvd" in m]
    return {"pairs": len(pairs), "ratios": ratios, "by_pair": pairs, "median": _median(ratios),
            "engine_ratios": engine_ratios, "engine_median": _median(engine_ratios),
            "min": min(ratios), "max": max(ratios),
            "base_median": _median([m["base"] for m in pairs.values()]),
            "fvd_median": _median([m["fvd"] for m in pairs.values()])}


def overhead_summary(rows: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Per N: median seconds per particle-step per method, overheads over base, engine-only time."""
    out = []
    for n in cfg.toy_particles:
        entry: dict[str, Any] = {"n": n}
        for method in TOY_METHODS:
            mine = [r for r in rows if r["n_particles"] == n and r["method"] == method]
            entry[method] = _median([r["seconds_per_particle_step"] for r in mine])
            engine = [r["engine_seconds_per_particle_step"] for r in mine
                      if r.get("engine_seconds_per_particle_step") is not None]
            entry[f"{method}_engine"] = _median(engine)
            entry[f"{method}_repeats"] = len(mine)
        for method in ("fvd", "smc"):
            entry[f"{method}_over_base"] = entry[method] - entry["base"]
        if any(entry[f"{m}_repeats"] for m in TOY_METHODS):
            out.append(entry)
    return out


def _us(value: float) -> str:
    return "n/a" if value is None or value != value else f"{value * 1e6:.3f}"


def _step_cell(counts: list[int]) -> str:
    full = counts[1:-1]  # the steps between two denoiser calls (the last runs on to the end)
    if not full:
        return "n/a"
    return f"{statistics.median(full):g} ({min(full)}-{max(full)})"


def command_line(argv: list[str]) -> str:
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return prefix + shlex.join(["python", str(script), *argv])


def report(rows: list[dict[str, Any]], cfg: BenchConfig, command: str, env: dict[str, Any],
           figure: str | None) -> str:
    parts = select_rows(rows, cfg)
    lines = ["# Engine micro-benchmarks", "", "Produced by:", "", f"    {command}", ""]
    machine = f"{env['cpu']} ({env['cpu_count']} cores)" + (f", GPU {env['gpu']}" if "gpu" in env else "")
    if env.get("load_average") is not None:
        machine += f", 1-minute load average {env['load_average']} at the start of the last invocation"
    lines += [f"Machine: {machine}; torch {env['torch']}, device `{cfg.device}`, {cfg.threads} torch thread(s); "
              f"engine at git `{env['git']}` ({env['fvdiffusion']}). Rows: `{RESULTS}` beside this file "
              "(rerun the same command to finish an interrupted run; `--fresh` after the engine changes).", ""]

    lines += [f"## a. FVD / base wall time on MNIST (N = {cfg.mnist_particles}, K = {cfg.mnist_steps})", "",
              f"Shipped DDPM UNet, reward log p(class {cfg.mnist_class} | x0) from the shipped classifier, "
              "default method options. Pairs alternate ABBA (even pairs run base first), same seed within a "
              "pair, after one untimed warm-up run of each.", ""]
    ratio = ratio_summary(parts["ratio"])
    if ratio is None:
        lines += ["No complete pair yet.", ""]
    else:
        verdict = "met" if ratio["median"] <= RATIO_TARGET else "NOT met"
        lines += ["| pair | base s | fvd s | fvd / base |", "| ---: | ---: | ---: | ---: |"]
        for pair, walls in ratio["by_pair"].items():
            lines.append(f"| {pair} | {walls['base']:.3f} | {walls['fvd']:.3f} | {walls['fvd'] / walls['base']:.3f} |")
        lines += ["", f"**Median ratio {ratio['median']:.3f}** (min {ratio['min']:.3f}, max {ratio['max']:.3f}, "
                  f"{ratio['pairs']} pairs; median walls base {ratio['base_median']:.3f} s, "
                  f"fvd {ratio['fvd_median']:.3f} s). Target <= {RATIO_TARGET}: {verdict}. FVD's extra cost "
                  "includes its reward call at every step (base scores only the final samples).", ""]
        if ratio["engine_ratios"]:
            lines += [f"Without the time inside reward calls (the classifier's forward passes, timed around each "
                      f"call), the ratio is denoising plus the engine's own work: **median "
                      f"{ratio['engine_median']:.3f}** (min {min(ratio['engine_ratios']):.3f}, max "
                      f"{max(ratio['engine_ratios']):.3f}, {len(ratio['engine_ratios'])} pairs).", ""]

    lines += [f"## b. Engine time per particle-step against N (exact toy `{cfg.toy_problem}`, K = {cfg.toy_steps})",
              "", "Microseconds per particle-step, wall / (N K), median over repeats (the method order rotates "
              "between repeats; one untimed warm-up per N and method). The denoiser and reward are closed-form "
              "and sync-free, a few elementwise ops per particle. *Engine only* subtracts the time measured "
              "inside the denoiser and reward calls (CPU only). Flat across N is the target; a fixed per-step "
              "cost (Python, kernel launches) shows as a 1/N rise at small N.", ""]
    overhead = overhead_summary(parts["overhead"], cfg)
    if not overhead:
        lines += ["No rows yet.", ""]
    else:
        lines += ["| N | base | fvd | smc | fvd - base | smc - base | engine only: base | fvd | smc | repeats |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in overhead:
            reps = "/".join(str(e[f"{m}_repeats"]) for m in TOY_METHODS)
            lines.append(f"| {e['n']} | {_us(e['base'])} | {_us(e['fvd'])} | {_us(e['smc'])} | "
                         f"{_us(e['fvd_over_base'])} | {_us(e['smc_over_base'])} | {_us(e['base_engine'])} | "
                         f"{_us(e['fvd_engine'])} | {_us(e['smc_engine'])} | {reps} |")
        lines.append("")
    if figure:
        lines += [f"![engine overhead]({figure})", ""]

    lines += [f"## c. Host synchronisations in one MNIST FVD run (N = {cfg.profile_particles}, "
              f"K = {cfg.profile_steps}, torch.profiler)", ""]
    if not parts["profile"]:
        lines += ["No profile yet.", ""]
    for prof in _latest_by_method(parts["profile"]):
        k = prof["denoiser_calls_profiled"]
        lines += [f"### {prof['method']}", ""]
        if prof["method"] == ACCELERATOR_PATH:
            lines += ["The same run with the code a GPU runs, forced on the CPU (`force_eager(False)`): checks "
                      "deferred to the end of the run, gathers out of place, trace numbers read once at the end.",
                      ""]
        lines += ["Ops that would force a host synchronisation on an accelerator, counted by where they start: "
                  "*setup* is before the first denoiser call; *per step* is the median (min-max) over the "
                  f"{max(k - 1, 0)} steps that run from the start of one denoiser call to the start of the next; "
                  "*last step* runs from the last denoiser call to the end of the run (final selection, result). "
                  "Ops inside the denoiser and reward calls are counted apart. *Sync points* counts each op above "
                  "once even when one calls another (repeat_interleave calls item, for instance). "
                  f"Profiled run: {prof['profiled_wall_seconds']:.2f} s wall, {k} denoiser calls, "
                  f"{prof['reward_calls_profiled']} reward calls.", "",
                  "| op | setup | per step | last step | engine total | in denoiser | in reward |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in prof["categories"]:
            counts = prof["engine_counts"][name]
            lines.append(f"| {name} | {counts[0]} | {_step_cell(counts)} | {counts[-1]} | {sum(counts)} | "
                         f"{prof['denoiser_counts'][name]} | {prof['reward_counts'][name]} |")
        on_cuda = any("self_device_ms" in r for r in prof["top_ops"])
        lines += ["", f"Top {TOP_OPS} ops by self CPU time, whole run (the `{RUN_RANGE}` range's self time is "
                  "Python time between ops):", "",
                  "| op | calls | self CPU ms |" + (" self device ms |" if on_cuda else ""),
                  "| --- | ---: | ---: |" + (" ---: |" if on_cuda else "")]
        for r in prof["top_ops"]:
            lines.append(f"| `{r['name']}` | {r['calls']} | {r['self_cpu_ms']:.2f} |"
                         + (f" {r['self_device_ms']:.2f} |" if on_cuda else ""))
        lines += ["", f"Top {TOP_OPS} engine ops by self CPU time (outside the denoiser and reward calls):", "",
                  "| op | calls | self CPU ms |", "| --- | ---: | ---: |"]
        for r in prof["top_engine_ops"]:
            lines.append(f"| `{r['name']}` | {r['calls']} | {r['self_cpu_ms']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _latest_by_method(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        latest[r["method"]] = r
    return list(latest.values())


def plot(rows: list[dict[str, Any]], cfg: BenchConfig, path: Path) -> Path | None:
    """engine.png: time and overhead per particle-step against N (log-x), and the MNIST pair ratios."""
    parts = select_rows(rows, cfg)
    overhead = overhead_summary(parts["overhead"], cfg)
    ratio = ratio_summary(parts["ratio"])
    if not overhead and ratio is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = {"base": "tab:gray", "fvd": "tab:blue", "smc": "tab:orange"}
    ns = [e["n"] for e in overhead]
    ax = axes[0]
    for method in TOY_METHODS:
        ax.plot(ns, [e[method] * 1e6 for e in overhead], "o-", color=colours[method], label=f"{method} (wall)")
        engine = [e[f"{method}_engine"] * 1e6 for e in overhead]
        if any(v == v for v in engine):
            ax.plot(ns, engine, "x--", color=colours[method], label=f"{method} (engine only)")
    ax.set(xscale="log", yscale="log", xlabel="particles N", ylabel="µs per particle-step",
           title=f"Time per particle-step, toy {cfg.toy_problem}, K={cfg.toy_steps}")
    ax.legend(fontsize=8)
    ax = axes[1]
    extra = {m: [e[f"{m}_over_base"] * 1e6 for e in overhead] for m in ("fvd", "smc")}
    for method, values in extra.items():
        ax.plot(ns, values, "o-", color=colours[method], label=f"{method} - base")
    finite = [v for values in extra.values() for v in values if v == v]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
        scale = "log"
    else:  # noise can make a small overhead negative: symlog keeps the sign
        ax.axhline(0, color="black", lw=0.8)
        ax.set_yscale("symlog", linthresh=min((abs(v) for v in finite if v), default=1e-3))
        scale = "symlog"
    ax.set_xscale("log")
    ax.set(xlabel="particles N", ylabel=f"µs per particle-step ({scale})",
           title="Overhead over base per particle-step (flat = target)")
    ax.legend(fontsize=8)
    ax = axes[2]
    if ratio is not None:
        ax.plot(list(ratio["by_pair"]), ratio["ratios"], "o", color="tab:blue", label="pair fvd / base")
        ax.set_xticks(list(ratio["by_pair"]))
        ax.axhline(ratio["median"], color="tab:blue", lw=1, label=f"median {ratio['median']:.3f}")
        if ratio["engine_ratios"]:
            ax.plot(list(ratio["by_pair"])[: len(ratio["engine_ratios"])], ratio["engine_ratios"], "x",
                    color="tab:green", label="same, reward-call time removed")
            ax.axhline(ratio["engine_median"], color="tab:green", lw=1,
                       label=f"median {ratio['engine_median']:.3f}")
        ax.axhline(RATIO_TARGET, color="tab:red", ls="--", lw=1, label=f"target {RATIO_TARGET}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xlabel="pair", ylabel="wall-time ratio",
               title=f"MNIST FVD / base, N={cfg.mnist_particles}, K={cfg.mnist_steps}")
        low = min([1.0, *ratio["ratios"], *ratio["engine_ratios"]])
        high = max([RATIO_TARGET, *ratio["ratios"], *ratio["engine_ratios"]])
        ax.set_ylim(low - 0.6 * (high - low), high + 0.05 * (high - low))  # room below for the legend
        ax.legend(fontsize=7, loc="lower center", ncol=2)
    else:
        ax.set_axis_off()
    fig.suptitle(f"Engine micro-benchmarks ({cfg.device}, {cfg.threads} thread(s))")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, cfg: BenchConfig, command: str, env: dict[str, Any]) -> tuple[Path, Path | None]:
    rows = RecordLog(out / RESULTS, KEY_FIELDS).rows
    figure = plot(rows, cfg, out / "engine.png")
    text = report(rows, cfg, command, env, figure.name if figure else None)
    write_atomically(out / "results.md", (text + "\n").encode("utf-8"))
    return out / "results.md", figure


# --- entry point --------------------------------------------------------------------------------

def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv: list[str]) -> tuple[BenchConfig, Path, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke sizes: MNIST N=16 K=4, 2 pairs; toy "
                        "N=16,256,4096 K=5, 2 repeats; profile N=16 K=4 (default out runs/engine_bench_quick).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu).")
    parser.add_argument("--threads", type=_positive, default=1, help="torch CPU threads, >= 1 (default 1).")
    parser.add_argument("--out", type=Path, default=None, help="Output directory (default benchmarks/engine, "
                        "or runs/engine_bench_quick with --quick).")
    parser.add_argument("--parts", default=",".join(PARTS), help="Comma-separated parts to run: ratio, overhead, "
                        "profile (default all).")
    parser.add_argument("--fresh", action="store_true", help="Delete OUT/results.jsonl first (after an engine change).")
    parser.add_argument("--report-only", action="store_true", help="Only rewrite results.md and engine.png.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--class", dest="mnist_class", type=int, default=None, help="MNIST target class (default 2).")
    parser.add_argument("--mnist-particles", type=_positive, default=None, help="Part a: N (default 64).")
    parser.add_argument("--mnist-steps", type=_positive, default=None, help="Part a: K (default 20).")
    parser.add_argument("--pairs", type=_positive, default=None, help="Part a: base/fvd pairs (default 5).")
    parser.add_argument("--toy-particles", type=_int_tuple, default=None,
                        help="Part b: N values (default 16,64,256,1024,4096,16384).")
    parser.add_argument("--toy-steps", type=_positive, default=None, help="Part b: K (default 20).")
    parser.add_argument("--repeats", type=_positive, default=None, help="Part b: repeats (default 5).")
    parser.add_argument("--profile-particles", type=_positive, default=None, help="Part c: N (default 64).")
    parser.add_argument("--profile-steps", type=_positive, default=None, help="Part c: K (default 20).")
    args = parser.parse_args(argv)

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown {unknown or 'empty'}; choose from {', '.join(PARTS)}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {args.device}: not a device")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    if args.mnist_class is not None and not 0 <= args.mnist_class <= 9:
        parser.error(f"--class must be 0-9, got {args.mnist_class}")
    overrides = {name: getattr(args, name) for name in
                 ("seed", "mnist_class", "mnist_particles", "mnist_steps", "pairs", "toy_particles", "toy_steps",
                  "repeats", "profile_particles", "profile_steps") if getattr(args, name) is not None}
    overrides.update(device=args.device, threads=args.threads, parts=parts)
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    out = args.out or (REPO / "runs" / "engine_bench_quick" if args.quick else REPO / "benchmarks" / "engine")
    return cfg, out, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, out, args = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    command = command_line(argv)
    env = environment(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh and (out / RESULTS).exists():
        (out / RESULTS).unlink()
    log = RecordLog(out / RESULTS, KEY_FIELDS)
    _say(f"engine_bench: {asdict(cfg)} -> {out}")
    if not args.report_only:
        started = time.perf_counter()
        models = None
        if "ratio" in cfg.parts or "profile" in cfg.parts:
            needs = ("ratio" in cfg.parts and any(
                not log.done(**_key(cfg, "ratio", cfg.mnist_problem, cfg.mnist_particles, cfg.mnist_steps, m, p))
                for p in range(cfg.pairs) for m in ("base", "fvd"))) or ("profile" in cfg.parts and not all(log.done(
                    **_key(cfg, "profile", cfg.mnist_problem, cfg.profile_particles, cfg.profile_steps, label, 0))
                    for label in profile_labels(cfg.device)))
            models = mnist_models(cfg) if needs else None
        if "ratio" in cfg.parts:
            run_ratio(cfg, log, env, models)
        if "overhead" in cfg.parts:
            run_overhead(cfg, log, env)
        if "profile" in cfg.parts:
            run_profile(cfg, log, env, models)
        _say(f"measured in {time.perf_counter() - started:.1f} s")
    md, figure = write_report(out, cfg, command, env)
    _say(f"wrote {md}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
