"""``fvd bench scaling``: one FVD population spread over P processes (DESIGN §8), timed and metered.

Per configuration (testbed, N, P) it measures the wall time per denoising step, the particle
bytes that selections move between ranks against the bound 2 x dead fraction x N x particle
size (one x̂0 and one ε̂ per clone that crosses ranks, at most one clone per dead particle),
and the scalar bytes all-gathered per selection. The noise chunk is N/4 for every P, so the
runs at one N are the same computation whatever P is (bit for bit on the CPU).

Every configuration runs in a fresh group of P local processes (:func:`fvdiffusion.launch.launch`,
P = 1 included, so that every P pays the same process and group set-up outside the timed runs);
rank 0 appends one row per timed run to ``results.jsonl`` as soon as it is taken, so an
interrupted benchmark resumes at the next missing run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fvdiffusion.durable import RecordLog
from fvdiffusion.errors import ConfigError

TESTBEDS = ("toy", "mnist")
GRIDS = {"toy": (16, 64, 256, 1024, 4096, 16384), "mnist": (16, 64, 256, 1024)}
QUICK_GRIDS = {"toy": (16, 64), "mnist": (16,)}
STEPS = {"toy": 50, "mnist": 20}  # the whole default grid takes about 20 min on 2 CPU cores
QUICK_STEPS = 2
WARMUP_STEPS = 2                  # one untimed run per group: first calls allocate and fill caches
WARMUP_SEED = 12345
CHUNKS_PER_RUN = 4                # noise_chunk = N / 4: whole chunks fit on up to 4 processes
MAX_PROCS = CHUNKS_PER_RUN
KEY_FIELDS = ("testbed", "n", "procs", "repeat", "steps", "device", "threads")
TOY_PROBLEM = "gmm2d-component"
MNIST_CLASS = 3


@dataclass(frozen=True)
class ScalingConfig:
    """What to measure: the grid, the repeats, where the processes compute."""

    testbeds: tuple[str, ...] = TESTBEDS
    procs: tuple[int, ...] = (1, 2)
    repeats: int = 3
    quick: bool = False
    device: str = "cpu"   # cpu: gloo; cuda: NCCL with one GPU per rank
    threads: int = 1      # torch threads per process

    def __post_init__(self) -> None:
        unknown = [t for t in self.testbeds if t not in TESTBEDS]
        if not self.testbeds or unknown:
            raise ConfigError(f"invalid testbeds={','.join(self.testbeds)!r}: expected some of {', '.join(TESTBEDS)}")
        if not self.procs or any(p < 1 or p > MAX_PROCS for p in self.procs) or len(set(self.procs)) < len(self.procs):
            raise ConfigError(f"invalid procs={self.procs!r}: distinct process counts in [1, {MAX_PROCS}] "
                              f"(every run has {CHUNKS_PER_RUN} noise chunks and a process holds whole chunks)")
        if self.repeats < 1:
            raise ConfigError(f"invalid repeats={self.repeats}: expected >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"invalid device={self.device!r}: expected cpu or cuda")
        if self.device == "cuda" and "toy" in self.testbeds:
            raise ConfigError("invalid device='cuda' for the toy testbed: its exact mixture denoiser runs on the "
                              "CPU; use testbeds=mnist")

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def sizes(self, testbed: str) -> tuple[int, ...]:
        return (QUICK_GRIDS if self.quick else GRIDS)[testbed]

    def steps(self, testbed: str) -> int:
        return QUICK_STEPS if self.quick else STEPS[testbed]

    def cells(self) -> list["Cell"]:
        return [Cell(t, n, p, self.steps(t), self.device, self.threads)
                for t in self.testbeds for n in self.sizes(t) for p in sorted(self.procs)]


@dataclass(frozen=True)
class Cell:
    """One configuration: a population of ``n`` on ``procs`` processes."""

    testbed: str
    n: int
    procs: int
    steps: int
    device: str
    threads: int

    @property
    def noise_chunk(self) -> int:
        return max(1, self.n // CHUNKS_PER_RUN)

    def key(self, repeat: int) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in KEY_FIELDS if k != "repeat"}, "repeat": repeat}


@dataclass(frozen=True)
class Job:
    """What every rank of one group runs: the cell's missing repeats, rows written by rank 0."""

    cell: Cell
    repeats: tuple[int, ...]
    results_path: str


# --- in the workers -----------------------------------------------------------------------------

@dataclass
class Testbed:
    denoiser: Any
    reward: Any
    lam: float


def build_testbed(name: str, device: str) -> Testbed:
    if name == "toy":
        from fvdiffusion.schedule import VPSchedule
        from fvdiffusion.testbeds import toy_problem

        problem = toy_problem(TOY_PROBLEM)
        return Testbed(problem.denoiser(VPSchedule.linear(1000)), problem.reward, problem.lam)
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier

    where = torch.device(device, torch.distributed.get_rank()) if device == "cuda" else torch.device(device)
    return Testbed(load_ddpm(device=where), ClassifierReward(load_reward_classifier(device=where), MNIST_CLASS), 1.0)


def run_fvd(testbed: Testbed, cell: Cell, steps: int, seed: int):
    import fvdiffusion as fv

    return fv.sample("fvd", testbed.denoiser, testbed.reward, lam=testbed.lam, n_particles=cell.n,
                     num_steps=steps, seed=seed, noise_chunk=cell.noise_chunk)


def measure_cell(job: Job) -> int:
    """Runs in every rank: one untimed warm-up, then the timed repeats; returns the rows written."""
    testbed = build_testbed(job.cell.testbed, job.cell.device)
    run_fvd(testbed, job.cell, WARMUP_STEPS, seed=WARMUP_SEED)
    log = RecordLog(Path(job.results_path), KEY_FIELDS) if torch.distributed.get_rank() == 0 else None
    for repeat in job.repeats:
        result = run_fvd(testbed, job.cell, job.cell.steps, seed=repeat)
        if log is not None:
            log.append(measurement_row(result, job.cell, repeat))
    return len(job.repeats)


def measurement_row(result, cell: Cell, repeat: int) -> dict[str, Any]:
    """One timed run: its wall time and what its selections moved."""
    info = result.extras["distributed"]
    particle_bytes = result.samples[0].numel() * result.samples.element_size()
    dead = [row.dead_fraction for row in result.trace if row.selected]
    selections = info["selections"]
    mean_dead = statistics.fmean(dead) if dead else 0.0
    bound = 2 * mean_dead * cell.n * particle_bytes
    moved = info["particle_bytes_moved"] / selections if selections else 0.0
    return {
        **cell.key(repeat), "seed": repeat, "noise_chunk": info["noise_chunk"], "blocks": info["blocks"],
        "world_size": info["world_size"], "wall_seconds": result.cost.wall_seconds,
        "step_seconds": result.cost.wall_seconds / cell.steps, "selections": selections,
        "selected_steps": len(dead), "mean_dead_fraction": mean_dead, "particle_bytes": particle_bytes,
        "particle_rows_moved": info["particle_rows_moved"], "particle_bytes_moved": info["particle_bytes_moved"],
        "bytes_per_selection": moved, "bound_per_selection": bound,
        "bound_ratio": moved / bound if bound > 0 else None,
        "scalar_bytes_gathered": info["scalar_bytes_gathered"],
        "scalar_bytes_per_selection": info["scalar_bytes_gathered"] / selections if selections else None,
        "samples_bytes_gathered": info["samples_bytes_gathered"], "torch": torch.__version__,
    }


# --- in the parent ------------------------------------------------------------------------------

@dataclass
class Progress:
    """The progress bar's hooks: how many runs are to do, a call as a group starts (done=0) and as it ends."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[Cell, int], None] = lambda cell, done: None
    close: Callable[[], None] = lambda: None


def tqdm_progress() -> Progress:
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    def start(total: int) -> None:
        bar["tqdm"] = tqdm(total=total, desc="scaling runs", unit="run", dynamic_ncols=True)

    def advance(cell: Cell, done: int) -> None:
        bar["tqdm"].set_postfix_str(f"{cell.testbed} N={cell.n} P={cell.procs}")
        bar["tqdm"].update(done)

    return Progress(start, advance, lambda: bar["tqdm"].close())


def missing_repeats(log: RecordLog, cell: Cell, repeats: int) -> tuple[int, ...]:
    return tuple(r for r in range(repeats) if not log.done(**cell.key(r)))


def run_scaling(cfg: ScalingConfig, out_dir: Path, fresh: bool = False, progress: Progress | None = None) -> list[dict]:
    """Measure every missing run of the grid; returns every row of ``results.jsonl`` for this grid."""
    from fvdiffusion.launch import launch

    progress = progress or Progress()
    path = Path(out_dir) / "results.jsonl"
    if fresh and path.exists():
        path.unlink()
    log = RecordLog(path, KEY_FIELDS)
    todo = [(cell, missing_repeats(log, cell, cfg.repeats)) for cell in cfg.cells()]
    todo = [(cell, repeats) for cell, repeats in todo if repeats]
    progress.start(sum(len(r) for _, r in todo))
    try:
        for cell, repeats in todo:
            progress.advance(cell, 0)  # name the configuration now running
            done = launch(measure_cell, (Job(cell, repeats, str(path)),), nproc=cell.procs, backend=cfg.backend,
                          threads=cfg.threads)
            progress.advance(cell, done)
    finally:
        progress.close()
    return grid_rows(cfg, RecordLog(path, KEY_FIELDS).rows)


def grid_rows(cfg: ScalingConfig, rows: Sequence[dict]) -> list[dict]:
    """The rows of this grid (a results file may also hold runs of another grid, e.g. --quick)."""
    wanted = {tuple(cell.key(r)[k] for k in KEY_FIELDS) for cell in cfg.cells() for r in range(cfg.repeats)}
    return [row for row in rows if tuple(row.get(k) for k in KEY_FIELDS) in wanted]


# --- summaries, report, figure ------------------------------------------------------------------

@dataclass
class Summary:
    """One configuration over its repeats."""

    testbed: str
    n: int
    procs: int
    repeats: int
    step_median: float | None    # None: no repeat of this configuration holds a timing
    step_min: float | None
    step_max: float | None
    bytes_per_selection: float | None
    bound_per_selection: float | None
    bound_ratio: float | None
    scalar_bytes_per_selection: float | None
    selections: int | None
    selected_steps: int | None
    efficiency: float | None = None   # T(1) / (P T(P)) at the same N, from the medians


def summarise(rows: Sequence[dict]) -> list[Summary]:
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["testbed"], row["n"], row["procs"]), []).append(row)
    summaries = [_summary(key, group) for key, group in sorted(groups.items(), key=_order)]
    one = {(s.testbed, s.n): s.step_median for s in summaries if s.procs == 1 and s.step_median is not None}
    for s in summaries:
        if (s.testbed, s.n) in one and s.step_median:
            s.efficiency = one[(s.testbed, s.n)] / (s.procs * s.step_median)
    return summaries


def _order(item: tuple[tuple[str, int, int], list]) -> tuple:
    (testbed, n, procs), _ = item
    return (TESTBEDS.index(testbed) if testbed in TESTBEDS else len(TESTBEDS), n, procs)


def _numbers(group: list[dict], name: str) -> list[float]:
    """The finite values of ``name`` over the rows: a row missing it, or holding null, has none."""
    values = [row.get(name) for row in group]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _summary(key: tuple[str, int, int], group: list[dict]) -> Summary:
    times = _numbers(group, "step_seconds")
    moved, bound = _numbers(group, "bytes_per_selection"), _numbers(group, "bound_per_selection")
    scalars = _numbers(group, "scalar_bytes_per_selection")
    moved_mean = statistics.fmean(moved) if moved else None
    bound_mean = statistics.fmean(bound) if bound else None
    return Summary(*key, repeats=len(group), step_median=statistics.median(times) if times else None,
                   step_min=min(times, default=None), step_max=max(times, default=None),
                   bytes_per_selection=moved_mean, bound_per_selection=bound_mean,
                   bound_ratio=moved_mean / bound_mean if moved_mean is not None and bound_mean else None,
                   scalar_bytes_per_selection=statistics.fmean(scalars) if scalars else None,
                   selections=group[0].get("selections"), selected_steps=group[0].get("selected_steps"))


@dataclass(frozen=True)
class Machine:
    cores: int
    threads: int
    torch: str
    processor: str

    @classmethod
    def here(cls, threads: int) -> "Machine":
        return cls(os.cpu_count() or 1, threads, torch.__version__, platform.processor() or platform.machine())


def reproduce_command(cfg: ScalingConfig, out_dir: Path) -> str:
    parts = ["fvd bench scaling", f"--testbeds {','.join(cfg.testbeds)}", f"--procs {','.join(map(str, cfg.procs))}",
             f"--repeats {cfg.repeats}", f"--device {cfg.device}", f"--threads {cfg.threads}", f"--out {out_dir}"]
    return " ".join(parts + (["--quick"] if cfg.quick else []))


def scaling_report(cfg: ScalingConfig, rows: Sequence[dict], command: str, machine: Machine) -> str:
    summaries = summarise(rows)
    lines = ["# Sharded population: strong scaling and communication", "", "```", command, "```", "",
             f"Machine: {machine.cores} CPU core(s) ({machine.processor}), {machine.threads} torch thread(s) per "
             f"process, torch {machine.torch}, backend {cfg.backend} on {cfg.device}. Method: FVD with its defaults; "
             f"noise_chunk = N/{CHUNKS_PER_RUN} for every P, so the runs at one N are the same computation; "
             f"steps: " + ", ".join(f"{t} K={cfg.steps(t)}" for t in cfg.testbeds) +
             f"; {cfg.repeats} repeat(s) per configuration after one untimed warm-up run.", ""]
    lines += _oversubscription_note(cfg, machine)
    for testbed in cfg.testbeds:
        table = [s for s in summaries if s.testbed == testbed]
        if table:
            lines += [f"## {testbed}", "", *_table(table), ""]
    lines += ["## Findings", "", *findings(cfg, summaries, machine, rows), ""]
    return "\n".join(lines)


def _oversubscription_note(cfg: ScalingConfig, machine: Machine) -> list[str]:
    busiest = max(cfg.procs) * cfg.threads
    if cfg.device != "cpu" or busiest <= machine.cores:
        return []
    return [f"**This machine has {machine.cores} core(s): {max(cfg.procs)} processes x {cfg.threads} thread(s) "
            f"share them, so the rows with more processes than cores measure oversubscription, not strong "
            f"scaling.**", ""]


def _table(rows: Sequence[Summary]) -> list[str]:
    from fvdiffusion.bench.common.stats import markdown_table

    header = ["N", "P", "s/step median [min, max]", "efficiency T1/(P TP)", "bytes/selection", "bound/selection",
              "ratio", "scalar bytes/selection", "selections"]
    body = [[s.n, s.procs, _times(s), _pct(s.efficiency), _bytes(s.bytes_per_selection), _bytes(s.bound_per_selection),
             _ratio(s), _bytes(s.scalar_bytes_per_selection), "-" if s.selections is None else s.selections]
            for s in rows]
    return markdown_table(header, body).splitlines()


def _times(s: Summary) -> str:
    return "- (no timing)" if s.step_median is None else f"{s.step_median:.4g} [{s.step_min:.4g}, {s.step_max:.4g}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(s: Summary) -> str:
    return "-" if s.bound_ratio is None or s.procs == 1 else f"{s.bound_ratio:.3f}"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def mismatches(rows: Sequence[dict]) -> list[tuple[str, int, int]]:
    """(testbed, N, repeat) whose runs differ between process counts: they must be the same computation."""
    seen: dict[tuple[str, int, int], set] = {}
    for row in rows:
        seen.setdefault((row["testbed"], row["n"], row["repeat"]), set()).add(
            (row.get("mean_dead_fraction"), row.get("selected_steps")))
    return sorted(key for key, values in seen.items() if len(values) > 1)


def findings(cfg: ScalingConfig, summaries: Sequence[Summary], machine: Machine, rows: Sequence[dict]) -> list[str]:
    """The results in plain words, each target met or missed."""
    differ = mismatches(rows)
    out = [f"- Same computation on every P (dead fractions per step, averaged, equal across P at each N and seed): "
           + ("yes." if not differ else f"NO for {', '.join(f'{t} N={n} seed {r}' for t, n, r in differ)}.")]
    sharded = [s for s in summaries if s.procs > 1 and s.bound_ratio is not None]
    if sharded:
        worst = max(sharded, key=lambda s: s.bound_ratio)
        verdict = "met" if worst.bound_ratio <= 1 else "MISSED"
        out.append(f"- Bytes moved per selection vs the bound 2 x dead fraction x N x particle size: target ratio "
                   f"<= 1 {verdict}; the largest ratio is {worst.bound_ratio:.3f} ({worst.testbed} N={worst.n} "
                   f"P={worst.procs}).")
        out.append("  Far below the bound because FVD's default parent rule ('excess') draws parents only among the "
                   "particles above the mean weight, and a parent crosses once per receiving rank however many of "
                   "its slots clone it; the ratio falls as N grows.")
    for s in summaries:
        if s.testbed == "mnist" and s.procs > 1 and s.efficiency is not None:
            honest = s.procs * cfg.threads <= machine.cores or cfg.device != "cpu"
            if honest:
                verdict = "met" if s.efficiency >= 0.9 else "MISSED"
                out.append(f"- MNIST N={s.n}, 1 -> {s.procs} processes: efficiency {100 * s.efficiency:.0f}% "
                           f"(target >= 90%: {verdict}); {s.step_median:.3g} s/step on {s.procs}, "
                           f"{s.step_median * s.procs * s.efficiency:.3g} on one.")
            else:
                out.append(f"- MNIST N={s.n}, 1 -> {s.procs} processes: {100 * s.efficiency:.0f}%, but {s.procs} "
                           f"processes share {machine.cores} cores here: not a strong-scaling measurement, the "
                           f"target (>= 90% from 1 to 4) cannot be checked on this machine.")
    if any(s.testbed == "mnist" and (s.efficiency or 0) > 1.0 for s in summaries):
        out.append("- An efficiency above 100% is no real speed-up beyond P: read it as about 100%, within the "
                   "run-to-run noise of a shared machine and memory effects (one process holding all N particles "
                   "runs slower per particle than each of two processes holding N/2).")
    if cfg.device == "cpu" and machine.cores < MAX_PROCS * cfg.threads:
        out.append(f"- The scaling target (>= 90% from 1 to {MAX_PROCS} processes) needs {MAX_PROCS * cfg.threads} "
                   f"free cores; this machine has {machine.cores}, so at most 1 -> {machine.cores // cfg.threads} "
                   f"is a strong-scaling measurement here.")
    toy = [s for s in summaries if s.testbed == "toy" and s.procs > 1 and s.efficiency is not None]
    if toy:
        best = max(toy, key=lambda s: s.efficiency)
        out.append(f"- Toy (exact 2-D mixture denoiser, microseconds per particle): the collectives dominate, "
                   f"so sharding does not pay; best efficiency {100 * best.efficiency:.0f}% at N={best.n} "
                   f"P={best.procs}.")
    scal = [s for s in summaries if s.procs > 1 and s.scalar_bytes_per_selection]
    if scal:
        per_particle = statistics.fmean(s.scalar_bytes_per_selection / s.n for s in scal)
        out.append(f"- Scalars all-gathered per selection grow as O(N): {per_particle:.1f} bytes per particle "
                   f"per selection on average (summed over the ranks' sends).")
    return out or ["- No runs with more than one process: nothing to compare."]


def write_figure(cfg: ScalingConfig, summaries: Sequence[Summary], path: Path) -> Path:
    """Per-step time vs N (log-log, one line per testbed and P), bytes per selection vs the bound, efficiency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvdiffusion.bench.common.images import save_figure

    fig, (time_ax, bytes_ax, eff_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
    for testbed, marker in zip(cfg.testbeds, "os"):
        for procs in sorted(cfg.procs):
            label = f"{testbed} P={procs}"
            timed = [s for s in summaries if s.testbed == testbed and s.procs == procs and s.step_median is not None]
            if timed:
                err = [[s.step_median - s.step_min for s in timed], [s.step_max - s.step_median for s in timed]]
                time_ax.errorbar([s.n for s in timed], [s.step_median for s in timed], yerr=err, marker=marker,
                                 capsize=3, label=label)
            moved = [s for s in summaries if s.testbed == testbed and s.procs == procs
                     and s.bytes_per_selection is not None and s.bound_per_selection is not None]
            if procs > 1 and moved:
                ns = [s.n for s in moved]
                line = bytes_ax.plot(ns, [max(s.bytes_per_selection, 1.0) for s in moved], marker=marker,
                                     label=f"{label} moved")
                bytes_ax.plot(ns, [s.bound_per_selection for s in moved], ls="--", marker="x",
                              color=line[0].get_color(), label=f"{label} bound")
            efficient = [s for s in timed if s.efficiency is not None]
            if procs > 1 and efficient:
                eff_ax.plot([s.n for s in efficient], [100 * s.efficiency for s in efficient], marker=marker, label=label)
    time_ax.set(xscale="log", yscale="log", xlabel="particles N", ylabel="seconds per step (median, min-max)",
                title="FVD wall time per step")
    bytes_ax.set(xscale="log", yscale="log", xlabel="particles N", ylabel="particle bytes per selection",
                 title="bytes moved vs bound 2·dead·N·size")
    eff_ax.axhline(90, color="grey", ls=":", label="target 90%")
    eff_ax.set(xscale="log", xlabel="particles N", ylabel="T(1) / (P·T(P))  [%]", title="strong-scaling efficiency")
    eff_ax.set_ylim(0, max([110.0] + [100 * (s.efficiency or 0.0) + 10 for s in summaries]))
    sizes = sorted({s.n for s in summaries})
    for ax in (time_ax, bytes_ax, eff_ax):
        ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
        ax.set_xticks([], minor=True)  # N are powers of 4: label them, not the decades
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(cfg: ScalingConfig, rows: Sequence[dict], out_dir: Path, command: str) -> list[Path]:
    """results.md and scaling.png from the rows."""
    from fvdiffusion.durable import write_atomically

    report = scaling_report(cfg, rows, command, Machine.here(cfg.threads))
    md = Path(out_dir) / "results.md"
    write_atomically(md, report.encode("utf-8"))
    return [md, write_figure(cfg, summarise(rows), Path(out_dir) / "scaling.png")]
