"""`fvd bench mnist`: every method on class-conditional MNIST, r(x) = log p(c | x̂0), λ = 1.

A *cell* is (method label, class c, seed). Each cell draws ``samples_per_class`` samples from
independent populations (population p of cell (c, seed) uses sampler seed
``population_seed(seed, c, p)``, the same for every method, so methods see the same noise)
and scores them in the evaluation network's feature space against the held-out real digits
of class c: FID, eval-net accuracy, reward, diversity (mean pairwise feature distance, Vendi),
distinct lineages, denoiser and reward calls, wall time. A ``real (train)`` row scores as many
real training digits of class c the same way: the floor a perfect sampler would reach.

Fairness: particle methods share N and K, hence denoiser calls. Best-of-N keeps the top half
of each population, so it needs twice the populations (and calls) for the same sample count.
SVDD and DTS are swept over budgets (candidates M; rollouts as multiples of N), and the
base / SMC / FVD rows are repeated at other step counts for the compute-scaling figure.

Seed 0 is the tuning seed: the grids in :data:`TUNING_GRIDS` run on it (on
``tuning_classes``) and the best FVD and SMC settings by mean FID enter as ``fvd-tuned`` /
``smc-tuned``; reported seeds never include 0. Every finished cell is appended to
``results.jsonl`` at once, keyed by (class, seed, resolved config), so a rerun skips it and two
labels with the same resolved config (e.g. a tuned setting equal to the default) share a cell.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

import fvdiffusion as fv
from fvdiffusion.bench.jsonl import ResultLog
from fvdiffusion.bench.stats import fmt_pm, markdown_table, mean_std
from fvdiffusion.bench.toy import MethodSpec
from fvdiffusion.samplers.config import CommonConfig

TUNING_SEED = 0
QUICK_CLASSES = (2, 5, 8)
NUM_CLASSES = 10
REAL_LABEL = "real (train)"
REFERENCE_LABEL = "smc-multinomial"   # the FK-steering default every relative change is against
FVD_LABEL = "fvd"
CLAIMED_FID_CHANGE = (-20.0, -14.0)   # the method's own report, % against SMC
BON_KEEP_FRACTION = 0.5
MAX_POPULATIONS = 1000                # population_seed packs p into three decimal digits
KEY_FIELDS = ("class", "seed", "resolved")

# Tiny on purpose (compute is scarce): each method's default and the setting the toy
# benchmark chose for it.
TUNING_GRIDS: dict[str, list[dict[str, Any]]] = {
    "fvd": [{}, {"rebirth_noise": 0.5, "selection_interval": 5, "selection_start": 0.2}],
    "smc": [{}, {"ess_threshold": 0.5}],
}


def particle_methods(n_particles: int) -> tuple[MethodSpec, ...]:
    keep = max(1, int(n_particles * BON_KEEP_FRACTION))
    return (
        MethodSpec("base", "base", {}, "no reward (all classes: shows what alignment buys)"),
        MethodSpec("bon", "bon", {"top_k": keep}, f"best-of-N: each population keeps its top {keep} of {n_particles}"),
        MethodSpec("smc-multinomial", "smc", {}, "FK steering default: diff potential, resample every step"),
        MethodSpec("smc-systematic", "smc", {"scheme": "systematic"}),
        MethodSpec("vasr", "vasr", {}),
        MethodSpec("fvd", "fvd", {}, "defaults: diff, excess parents, nu=0 under DDPM, every step"),
        MethodSpec("fvd-nu1", "fvd", {"rebirth_noise": 1.0}, "ablation: full rebirth noise"),
        MethodSpec("fvd-weighted", "fvd", {"parent_rule": "weighted"}, "ablation: weighted parents (killing rule)"),
        MethodSpec("fvd-ctrl", "fvd", {"target_dead_fraction": 0.2}, "ablation: absorption controller, alpha*=0.2"),
    )


SCALING_LABELS = ("base", "smc-multinomial", "fvd")


@dataclass(frozen=True)
class PlannedMethod:
    """A row of the benchmark: its sampler spec, the curve it belongs to in the compute
    figure (``family``), and its table (``group``: real, main, tuned, value, scaling)."""

    spec: MethodSpec
    family: str
    group: str
    budget: int | None = None  # M for svdd, rollouts for dts, steps K for the particle methods


def _check_ints(name: str, values: tuple[int, ...], minimum: int, maximum: int | None = None) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{name}: expected integers {bound}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")


@dataclass(frozen=True)
class MnistBenchConfig:
    """What to run. ``dts_rollout_factors`` are multiples of N (≈ that many times the base
    compute, like svdd's M); ``scaling_steps`` are the extra step counts for base / SMC / FVD."""

    classes: tuple[int, ...] = tuple(range(NUM_CLASSES))
    seeds: tuple[int, ...] = (1, 2, 3)
    samples_per_class: int = 256
    n_particles: int = 64
    num_steps: int = 50
    svdd_candidates: tuple[int, ...] = (2, 4, 8)
    dts_rollout_factors: tuple[int, ...] = (1, 4)
    scaling_steps: tuple[int, ...] = (25,)
    tune: bool = True
    tuning_classes: tuple[int, ...] = QUICK_CLASSES
    tuning_grids: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: TUNING_GRIDS)
    methods: tuple[MethodSpec, ...] | None = None   # None: particle_methods(n_particles)
    device: str = "cpu"
    batch_size: int | None = None
    grid_images: int = 16

    def __post_init__(self) -> None:
        _check_ints("classes", self.classes, 0, NUM_CLASSES - 1)
        _check_ints("seeds", self.seeds, 0)
        if TUNING_SEED in self.seeds:
            raise ValueError(f"seeds must not contain the tuning seed {TUNING_SEED}: got {self.seeds}")
        _check_ints("samples_per_class", (self.samples_per_class,), 2)
        _check_ints("n_particles", (self.n_particles,), 2)
        _check_ints("num_steps", (self.num_steps,), 2)
        if self.svdd_candidates:
            _check_ints("svdd_candidates", self.svdd_candidates, 1)
        if self.dts_rollout_factors:
            _check_ints("dts_rollout_factors", self.dts_rollout_factors, 1)
        if self.scaling_steps:
            _check_ints("scaling_steps", self.scaling_steps, 2)
            if self.num_steps in self.scaling_steps:
                raise ValueError(f"scaling_steps must not repeat num_steps={self.num_steps}: got {self.scaling_steps}")
        if self.tune:
            _check_ints("tuning_classes", self.tuning_classes, 0, NUM_CLASSES - 1)
            unknown = sorted(set(self.tuning_grids) - {"fvd", "smc"})
            if unknown or not all(self.tuning_grids.get(m) for m in ("fvd", "smc")):
                raise ValueError(f"tuning_grids: expected non-empty 'fvd' and 'smc' grids, got {self.tuning_grids}")
        if self.batch_size is not None:
            _check_ints("batch_size", (self.batch_size,), 1)
        _check_ints("grid_images", (self.grid_images,), 1)
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if math.ceil(self.samples_per_class / max(1, int(self.n_particles * BON_KEEP_FRACTION))) > MAX_POPULATIONS:
            raise ValueError(f"samples_per_class={self.samples_per_class} needs more than {MAX_POPULATIONS} "
                             f"populations of {self.n_particles}")
        for spec in self.method_specs():  # every option must build a valid sampler config
            sampler_config(spec, 1, self)
        if self.tune:
            for method, spec in _tuning_specs(self):
                sampler_config(spec, TUNING_SEED, self)

    @classmethod
    def quick(cls, **overrides: Any) -> "MnistBenchConfig":
        """3 classes, 1 seed, 64 samples per class, 20 steps, small sweeps (~100k denoiser calls)."""
        values: dict[str, Any] = dict(classes=QUICK_CLASSES, seeds=(1,), samples_per_class=64, n_particles=64,
                                      num_steps=20, svdd_candidates=(2, 4), dts_rollout_factors=(1, 2),
                                      scaling_steps=(10,))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def method_specs(self) -> tuple[MethodSpec, ...]:
        return self.methods if self.methods is not None else particle_methods(self.n_particles)


def sampler_config(spec: MethodSpec, seed: int, cfg: MnistBenchConfig) -> CommonConfig:
    """The validated sampler config of a cell (``num_steps`` in the options overrides K)."""
    params = {"n_particles": cfg.n_particles, "num_steps": cfg.num_steps, "seed": seed, "lam": 1.0,
              "batch_size": cfg.batch_size, **spec.options}
    return fv.make_config(spec.method, **params)


def population_seed(seed: int, cls: int, population: int) -> int:
    """Sampler seed of population p of cell (class, seed): the same for every method of the cell."""
    return (seed * 100 + cls) * MAX_POPULATIONS + population


def samples_per_population(spec: MethodSpec, cfg: MnistBenchConfig) -> int:
    return spec.options["top_k"] if spec.method == "bon" else cfg.n_particles


def populations(spec: MethodSpec, cfg: MnistBenchConfig) -> int:
    return math.ceil(cfg.samples_per_class / samples_per_population(spec, cfg))


def resolved(spec: MethodSpec, seed: int, cfg: MnistBenchConfig) -> str:
    """Everything that determines a cell's samples, as JSON: a cell reruns when any of it changes.

    The micro-batch size is left out: it does not change results, so a run may resume with
    another one (e.g. on another device).
    """
    if spec.method == "real":
        return json.dumps({"method": "real", "split": "train", "samples": cfg.samples_per_class}, sort_keys=True)
    config = sampler_config(spec, seed, cfg).as_dict()
    config.pop("batch_size")
    config.update(method=spec.method, populations=populations(spec, cfg), samples=cfg.samples_per_class)
    return json.dumps(config, sort_keys=True)


def plan(cfg: MnistBenchConfig, tuned: dict[str, MethodSpec] | None = None) -> list[PlannedMethod]:
    """Every reported row, in table order."""
    out = [PlannedMethod(MethodSpec(REAL_LABEL, "real", {}, "real training digits of class c: the floor"),
                         REAL_LABEL, "real")]
    out += [PlannedMethod(spec, spec.label, "main", cfg.num_steps) for spec in cfg.method_specs()]
    for method in ("fvd", "smc"):
        if tuned and method in tuned:
            out.append(PlannedMethod(tuned[method], tuned[method].label, "tuned", cfg.num_steps))
    for m in cfg.svdd_candidates:
        out.append(PlannedMethod(MethodSpec(f"svdd-M{m}", "svdd", {"n_candidates": m}, f"{m} candidates per step"),
                                 "svdd", "value", m))
    for factor in cfg.dts_rollout_factors:
        rollouts = factor * cfg.n_particles
        out.append(PlannedMethod(MethodSpec(f"dts-R{rollouts}", "dts", {"n_rollouts": rollouts},
                                            f"{rollouts} rollouts ({factor}x N) per tree of N samples"),
                                 "dts", "value", rollouts))
    by_label = {spec.label: spec for spec in cfg.method_specs()}
    for steps in cfg.scaling_steps:
        for label in SCALING_LABELS:
            if label in by_label:
                spec = by_label[label]
                out.append(PlannedMethod(MethodSpec(f"{label}-K{steps}", spec.method, {**spec.options, "num_steps": steps},
                                                    f"{label} with {steps} steps"), label, "scaling", steps))
    return out


def estimated_calls(spec: MethodSpec, cfg: MnistBenchConfig) -> int:
    """Denoiser calls of a cell (exact for particle methods and svdd, an upper bound for dts)."""
    if spec.method == "real":
        return 0
    config = sampler_config(spec, 1, cfg)
    n, k = config.n_particles, config.num_steps
    if spec.method == "svdd":
        per_population = n * (1 + config.n_candidates * (k - 1))
    elif spec.method in ("dts", "dts*"):
        per_population = min(config.n_rollouts * k, config.node_budget)
    else:
        per_population = n * k
    return populations(spec, cfg) * per_population


# --- models and data ---------------------------------------------------------------------

class BenchModels:
    """The shipped zoo on one device, the per-class reference FID scorers, and the real train digits."""

    def __init__(self, device: str) -> None:
        from fvdiffusion.zoo.loaders import load_ddpm, load_eval_net, load_reward_classifier
        from fvdiffusion.zoo.mnist_data import load_mnist

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        self.device = device
        self.ddpm = load_ddpm(device=device)
        self.reward_classifier = load_reward_classifier(device=device)
        self.eval_net = load_eval_net(device=device)
        self._reference = load_mnist("reference")
        self._train = load_mnist("train")
        self._fid: dict[int, Any] = {}

    def reference_fid(self, cls: int, batch_size: int | None):
        from fvdiffusion.metrics.images import FeatureFID, features_and_logits

        if cls not in self._fid:
            images = self._reference.images[self._reference.labels == cls]
            self._fid[cls] = FeatureFID(features_and_logits(self.eval_net, images, batch_size)[0])
        return self._fid[cls]

    def real_digits(self, cls: int, n: int, seed: int) -> torch.Tensor:
        images = self._train.images[self._train.labels == cls]
        if images.shape[0] < n:
            raise ValueError(f"only {images.shape[0]} training digits of class {cls}, need {n} for the real row")
        pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return images[pick]


def encode_images(images: torch.Tensor) -> str:
    """[n, 1, 28, 28] in [-1, 1] -> base64 of the uint8 pixels (compact enough for a JSONL row)."""
    from fvdiffusion.bench.images import to_uint8

    return base64.b64encode(to_uint8(images).numpy().tobytes()).decode("ascii")


def decode_images(text: str) -> torch.Tensor:
    """Inverse of :func:`encode_images`: [n, 1, 28, 28] float32 in [-1, 1]."""
    pixels = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    return pixels.float().reshape(-1, 1, 28, 28) / 127.5 - 1.0


def run_cell(models: BenchModels, spec: MethodSpec, cls: int, seed: int, cfg: MnistBenchConfig,
             keep_images: bool) -> dict[str, Any]:
    """Sample (or, for the real row, pick) the cell's samples and score them."""
    from fvdiffusion.metrics.images import features_and_logits, image_set_metrics
    from fvdiffusion.rewards.classifier import ClassifierReward

    reward = ClassifierReward(models.reward_classifier, cls)
    n_pop = populations(spec, cfg) if spec.method != "real" else 0
    samples, rewards, lineages, curves = [], [], [], []
    calls = {"denoiser_calls": 0, "reward_calls": 0, "wall_seconds": 0.0}
    if spec.method == "real":
        samples.append(models.real_digits(cls, cfg.samples_per_class, population_seed(seed, cls, 0)))
        rewards.append(reward(samples[0].to(models.device)).double().cpu())
    for p in range(n_pop):
        config = replace(sampler_config(spec, seed, cfg), seed=population_seed(seed, cls, p))
        res = fv.sample(spec.method, models.ddpm, reward, config=config)
        keep = samples_per_population(spec, cfg)
        samples.append((res.extras["top_k_samples"] if spec.method == "bon" else res.samples)[:keep])
        rewards.append(res.rewards[:keep].double().cpu())
        lineages.append(res.distinct_lineages())
        curves.append(res.lineage.genealogy_curve())
        calls["denoiser_calls"] += res.cost.denoiser_calls
        calls["reward_calls"] += res.cost.reward_calls
        calls["wall_seconds"] += res.cost.wall_seconds
    images = torch.cat([s.to(models.device) for s in samples])[: cfg.samples_per_class]
    feats, logits = features_and_logits(models.eval_net, images, cfg.batch_size)
    metrics = image_set_metrics(feats, logits, cls, models.reference_fid(cls, cfg.batch_size))
    reward_all = torch.cat(rewards)[: cfg.samples_per_class]
    finite = reward_all[torch.isfinite(reward_all)]
    row: dict[str, Any] = {
        "class": cls, "seed": seed, "resolved": resolved(spec, seed, cfg), "label": spec.label,
        "method": spec.method, "options": spec.options, **metrics.as_dict(),
        "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
        "populations": n_pop, "n_samples": int(images.shape[0]),
        "distinct_lineages": sum(lineages) / len(lineages) if lineages else None,
        "genealogy": torch.tensor(curves, dtype=torch.float64).mean(0).tolist() if curves else None,
        **calls, "device": models.device, "threads": torch.get_num_threads(),
    }
    if keep_images:
        row["samples_b64"] = encode_images(images[: cfg.grid_images])
    return row


# --- the run -----------------------------------------------------------------------------

@dataclass
class BenchOutcome:
    """What the report needs: the plan (with tuned rows), labelled rows, and the tuning scores."""

    plan: list[PlannedMethod]
    rows: list[dict[str, Any]]
    tuning: list[dict[str, Any]]


class _Progress:
    """A tqdm bar weighted by estimated denoiser calls (so 'time left' means something)."""

    def __init__(self, total_calls: int, n_cells: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max(total_calls, 1), desc="mnist", unit="call", unit_scale=True, disable=not enabled,
                        smoothing=0.1)
        self.n_cells, self.done = n_cells, 0

    def start(self, label: str, cls: int, seed: int) -> None:
        self.bar.set_postfix_str(f"cell {self.done + 1}/{self.n_cells} {label} c={cls} s={seed}", refresh=True)

    def finish(self, calls: int, skipped: bool) -> None:
        self.done += 1
        if skipped:  # resumed cells take no time: drop them from the total instead of counting them
            self.bar.total = max(self.bar.total - calls, self.bar.n, 1)
        else:
            self.bar.update(calls)

    def close(self) -> None:
        self.bar.close()


def run_mnist_bench(cfg: MnistBenchConfig, out_dir: Path, progress_bar: bool = True, compute: bool = True,
                    on_cell: Callable[[dict[str, Any]], None] | None = None) -> BenchOutcome:
    """Run (or resume) the benchmark; every finished cell is appended to OUT/results.jsonl at once.

    ``compute=False`` only reads the file (cells not in it are left out of the outcome).
    ``on_cell`` is called with each newly computed row after it is written.
    """
    log = ResultLog(Path(out_dir) / "results.jsonl", KEY_FIELDS)
    models: list[BenchModels] = []  # loaded on the first cell that needs computing

    def cell(spec: MethodSpec, cls: int, seed: int, keep_images: bool, progress: _Progress) -> dict[str, Any] | None:
        key = {"class": cls, "seed": seed, "resolved": resolved(spec, seed, cfg)}
        calls = estimated_calls(spec, cfg)
        if log.done(**key) or not compute:
            progress.finish(calls, skipped=True)
            return log.find(**key) if log.done(**key) else None
        progress.start(spec.label, cls, seed)
        if not models:
            models.append(BenchModels(cfg.device))
        row = run_cell(models[0], spec, cls, seed, cfg, keep_images)
        log.append(row)
        progress.finish(calls, skipped=False)
        if on_cell is not None:
            on_cell(row)
        return row

    tuning_specs = _tuning_specs(cfg) if cfg.tune else []
    # the tuned rows are not known before tuning; estimate them as their methods' defaults
    provisional = plan(cfg, {m: MethodSpec(f"{m}-tuned", m, {}) for m in ("fvd", "smc")} if cfg.tune else None)
    n_tune = len(tuning_specs) * len(cfg.tuning_classes)
    total = (sum(estimated_calls(s, cfg) for _, s in tuning_specs) * len(cfg.tuning_classes)
             + sum(estimated_calls(p.spec, cfg) for p in provisional) * len(cfg.classes) * len(cfg.seeds))
    progress = _Progress(total, n_tune + len(provisional) * len(cfg.classes) * len(cfg.seeds), progress_bar and compute)
    try:
        tuning, tuned = _tune(cfg, tuning_specs, lambda spec, cls: cell(spec, cls, TUNING_SEED, False, progress))
        full_plan = plan(cfg, tuned)
        rows = []
        grid_class, grid_seed = cfg.classes[0], cfg.seeds[0]
        # seed-major order: an interrupted run leaves whole (seed, class) blocks, every method in each
        for seed in cfg.seeds:
            for cls in cfg.classes:
                for planned in full_plan:
                    keep = cls == grid_class and seed == grid_seed
                    row = cell(planned.spec, cls, seed, keep, progress)
                    if row is not None:
                        rows.append({**row, "label": planned.spec.label, "family": planned.family,
                                     "group": planned.group, "budget": planned.budget, "note": planned.spec.note})
    finally:
        progress.close()
    return BenchOutcome(full_plan, rows, tuning)


def _tuning_specs(cfg: MnistBenchConfig) -> list[tuple[str, MethodSpec]]:
    out = []
    for method in ("fvd", "smc"):
        for options in cfg.tuning_grids[method]:
            label = f"tune:{method}:" + (",".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults")
            out.append((method, MethodSpec(label, method, dict(options))))
    return out


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "the defaults"


def _tune(cfg: MnistBenchConfig, specs: list[tuple[str, MethodSpec]],
          cell: Callable[[MethodSpec, int], dict[str, Any] | None]) -> tuple[list[dict[str, Any]], dict[str, MethodSpec]]:
    """Mean FID over the tuning classes on seed 0 for every grid point; the lowest wins."""
    scores: list[dict[str, Any]] = []
    for method, spec in specs:
        fids = [row["fid"] for row in (cell(spec, cls) for cls in cfg.tuning_classes) if row is not None]
        complete = len(fids) == len(cfg.tuning_classes)
        scores.append({"method": method, "options": spec.options, "label": spec.label,
                       "fid": sum(fids) / len(fids) if complete else None, "chosen": False})
    tuned = {}
    for method in ("fvd", "smc"):
        candidates = [s for s in scores if s["method"] == method and s["fid"] is not None]
        if not candidates or len(candidates) < sum(s["method"] == method for s in scores):
            continue  # tuning incomplete (report-only on a partial file): no tuned row
        best = min(candidates, key=lambda s: s["fid"])
        best["chosen"] = True
        tuned[method] = MethodSpec(f"{method}-tuned", method, dict(best["options"]),
                                   f"best on tuning seed {TUNING_SEED}: {_describe(best['options'])}")
    return scores, tuned


# --- the report --------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSummary:
    """One table row: means over the complete (class, seed) cells; ± is the spread over seeds."""

    label: str
    family: str
    group: str
    budget: int | None
    note: str
    fid_by_seed: list[float]
    fid: float
    fid_by_class: dict[int, float]
    accuracy: float
    reward: float
    pairwise_distance: float
    vendi: float
    lineages: float | None
    calls_per_sample: float
    reward_calls_per_sample: float
    wall_seconds: float
    genealogy: list[float] | None
    same_as: str | None      # another label with the identical resolved config, if any


def complete_cells(outcome: BenchOutcome) -> list[tuple[int, int]]:
    """(class, seed) pairs that every label with any row has a row for."""
    by_label: dict[str, set[tuple[int, int]]] = {}
    for r in outcome.rows:
        by_label.setdefault(r["label"], set()).add((r["class"], r["seed"]))
    if not by_label:
        return []
    return sorted(set.intersection(*by_label.values()))


def summarise(outcome: BenchOutcome) -> list[LabelSummary]:
    cells = set(complete_cells(outcome))
    rows = [r for r in outcome.rows if (r["class"], r["seed"]) in cells]
    first_label_of: dict[str, str] = {}
    out = []
    for planned in outcome.plan:
        label = planned.spec.label
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        by_seed = [sum(r["fid"] for r in mine if r["seed"] == s) / sum(r["seed"] == s for r in mine) for s in seeds]
        classes = sorted({r["class"] for r in mine})
        by_class = {c: mean_std([r["fid"] for r in mine if r["class"] == c])[0] for c in classes}
        n_samples = sum(r["n_samples"] for r in mine)
        lineages = [r["distinct_lineages"] for r in mine if r["distinct_lineages"] is not None]
        curves = [r["genealogy"] for r in mine if r.get("genealogy")]
        signature = mine[0]["resolved"]
        same_as = first_label_of.setdefault(signature, label)
        out.append(LabelSummary(
            label=label, family=planned.family, group=planned.group, budget=planned.budget, note=planned.spec.note,
            fid_by_seed=by_seed, fid=mean_std(by_seed)[0], fid_by_class=by_class,
            accuracy=mean_std([r["accuracy"] for r in mine])[0], reward=mean_std([r["reward_mean"] for r in mine])[0],
            pairwise_distance=mean_std([r["pairwise_distance"] for r in mine])[0],
            vendi=mean_std([r["vendi"] for r in mine])[0],
            lineages=mean_std(lineages)[0] if lineages else None,
            calls_per_sample=sum(r["denoiser_calls"] for r in mine) / n_samples,
            reward_calls_per_sample=sum(r["reward_calls"] for r in mine) / n_samples,
            wall_seconds=mean_std([r["wall_seconds"] for r in mine])[0],
            genealogy=torch.tensor(curves, dtype=torch.float64).mean(0).tolist() if curves else None,
            same_as=None if same_as == label else same_as,
        ))
    return out


def _pct(value: float, reference: float) -> str:
    if reference is None or math.isnan(reference) or reference == 0 or math.isnan(value):
        return "–"
    return f"{100 * (value / reference - 1):+.1f}%"


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def mnist_report(outcome: BenchOutcome, cfg: MnistBenchConfig, command: str = "") -> str:
    """results.md: settings, the main table, per-class FID, the value-based table, tuning, findings."""
    summaries = summarise(outcome)
    by_label = {s.label: s for s in summaries}
    cells = complete_cells(outcome)
    n_cells_any = len({(r["class"], r["seed"]) for r in outcome.rows})
    ref = by_label.get(REFERENCE_LABEL)
    fvd = by_label.get(FVD_LABEL)
    devices = sorted({f"{r['device']}" + (f" (torch threads: {r['threads']})" if r["device"] == "cpu" else "")
                      for r in outcome.rows})
    lines = ["# MNIST class-conditional benchmark\n",
             f"Task: r(x) = log p(c | x̂0) from the reward classifier, λ = 1, so the exact target is the "
             f"class-c data distribution. N = {cfg.n_particles} particles, K = {cfg.num_steps} DDPM steps, "
             f"{cfg.samples_per_class} samples per (method, class, seed) from independent populations; "
             f"classes {list(cfg.classes)}, reported seeds {list(cfg.seeds)} (tuning seed {TUNING_SEED} is not "
             f"reported); device {', '.join(devices)}.",
             f"Cells in the tables: {len(cells)} (class, seed) pairs"
             + (f" (of {n_cells_any} started: the table keeps only pairs every method finished)" if len(cells) < n_cells_any else "")
             + ".\n",
             "FID: Fréchet distance in the evaluation network's 96-d feature space to the held-out real digits of "
             "class c (all of them, ~200 per class), mean over classes, ± = std over seeds of that mean. "
             "With few samples FID is biased upward; compare rows, and see `real (train)` for the floor at this "
             "sample count. Acc = eval-net accuracy on class c. Pairwise = mean pairwise feature distance, Vendi "
             "= Vendi score (cosine kernel) of each cell's samples; in this feature space it mostly counts classes "
             "(compare with the real and base rows), so within-class spread shows better in Pairwise. Lineages = distinct step-K/2 ancestors of a "
             "population's final particles (of N), mean over populations. Calls = denoiser calls per returned "
             "sample; wall = sampling seconds per cell."]
    if command:
        lines.append(f"\nReproduce: `{command}`\n")
    header = ["method", "FID", f"ΔFID vs {REFERENCE_LABEL}", "acc", "reward", "pairwise", "Vendi", "lineages",
              "calls/sample", "wall s", "note"]
    table = []
    for s in summaries:
        note = s.note + (f" (same cell as {s.same_as})" if s.same_as else "")
        table.append([s.label, fmt_pm(s.fid_by_seed, 2), _pct(s.fid, ref.fid) if ref else "–", _f(s.accuracy, 3),
                      _f(s.reward, 2), _f(s.pairwise_distance, 2), _f(s.vendi, 1), _f(s.lineages, 1),
                      _f(s.calls_per_sample, 0), _f(s.wall_seconds, 1), note])
    lines.append("\n## All methods\n\n" + markdown_table(header, table))

    classes = sorted({c for s in summaries for c in s.fid_by_class})
    per_class = [[s.label] + [_f(s.fid_by_class.get(c), 2) for c in classes]
                 for s in summaries if s.group in ("real", "main", "tuned")]
    lines.append("\n## FID per class (mean over seeds)\n\n" + markdown_table(["method"] + [str(c) for c in classes], per_class))

    lines.append("\n## Value-based search against FVD\n")
    lines += value_based_lines(summaries, fvd)
    lines.append("\n## Tuning (seed 0)\n")
    lines += tuning_lines(outcome.tuning, cfg)
    lines.append("\n## Findings\n")
    lines += findings(summaries)
    for a, b in ((FVD_LABEL, REFERENCE_LABEL), ("fvd-tuned", "smc-tuned")):
        wins, total = cell_wins(outcome, a, b)
        if total:
            lines.append(f"- {a} has a lower FID than {b} in {wins} of {total} (class, seed) cells.")
    return "\n".join(lines) + "\n"


def value_based_lines(summaries: list[LabelSummary], fvd: LabelSummary | None) -> list[str]:
    value = [s for s in summaries if s.group == "value"]
    if not value:
        return ["No value-based rows were run."]
    if fvd is None:
        return ["No fvd row to compare against."]
    out = [f"FVD: FID {fvd.fid:.2f}, {fvd.calls_per_sample:.0f} denoiser calls per sample, {fvd.wall_seconds:.1f} s "
           "per cell. A budget *matches* FVD when its FID is at most FVD's.\n"]
    header = ["method", "budget", "FID", "calls/sample", "wall s", "wall / fvd wall", "matches fvd"]
    out.append(markdown_table(header, [
        [s.label, s.budget, fmt_pm(s.fid_by_seed, 2), _f(s.calls_per_sample, 0), _f(s.wall_seconds, 1),
         _f(s.wall_seconds / fvd.wall_seconds, 1) + "x" if fvd.wall_seconds > 0 else "–", "yes" if s.fid <= fvd.fid else "no"]
        for s in value]))
    for family, unit in (("svdd", "M"), ("dts", "rollouts")):
        rows = sorted((s for s in value if s.family == family), key=lambda s: s.budget)
        if not rows:
            continue
        match = next((s for s in rows if s.fid <= fvd.fid), None)
        if match is not None:
            out.append(f"- {family} first matches FVD's FID at {unit} = {match.budget} (FID {match.fid:.2f}), "
                       f"taking {match.wall_seconds / fvd.wall_seconds:.1f}x FVD's wall time and "
                       f"{match.calls_per_sample / fvd.calls_per_sample:.1f}x its denoiser calls.")
        else:
            best = min(rows, key=lambda s: s.fid)
            out.append(f"- no {family} budget tried matches FVD's FID; its best ({unit} = {best.budget}, FID "
                       f"{best.fid:.2f}) took {best.wall_seconds / fvd.wall_seconds:.1f}x FVD's wall time and "
                       f"{best.calls_per_sample / fvd.calls_per_sample:.1f}x its denoiser calls.")
    return out


def tuning_lines(tuning: list[dict[str, Any]], cfg: MnistBenchConfig) -> list[str]:
    if not tuning:
        return ["Tuning was off."]
    rows = [[t["method"], _describe(t["options"]), _f(t["fid"], 2), "chosen" if t["chosen"] else ""] for t in tuning]
    return [f"Grid points scored by mean FID over classes {list(cfg.tuning_classes)} on seed {TUNING_SEED}; the "
            "chosen settings are the `-tuned` rows above.\n", markdown_table(["method", "options", "FID", ""], rows)]


def cell_wins(outcome: BenchOutcome, label: str, other: str) -> tuple[int, int]:
    """In how many complete (class, seed) cells ``label`` has a lower FID than ``other``, and of how many."""
    cells = set(complete_cells(outcome))
    fid = {(r["label"], r["class"], r["seed"]): r["fid"] for r in outcome.rows if (r["class"], r["seed"]) in cells}
    pairs = [(fid[(label, c, s)], fid[(other, c, s)]) for c, s in sorted(cells)
             if (label, c, s) in fid and (other, c, s) in fid]
    return sum(a < b for a, b in pairs), len(pairs)


def findings(summaries: list[LabelSummary]) -> list[str]:
    """Plain statements read off the numbers (no judgement beyond the claim's own thresholds)."""
    s = {x.label: x for x in summaries}
    out = []
    fvd, smc = s.get(FVD_LABEL), s.get(REFERENCE_LABEL)
    if fvd and smc:
        change = 100 * (fvd.fid / smc.fid - 1)
        lo, hi = CLAIMED_FID_CHANGE
        verdict = ("within or beyond the claimed range" if change <= hi else
                   "FVD better, but by less than claimed" if change < 0 else "the claim did not hold: FVD is worse")
        out.append(f"- FVD against SMC (multinomial): FID {fvd.fid:.2f} vs {smc.fid:.2f}, {change:+.1f}% "
                   f"(claimed {lo:.0f}% to {hi:.0f}%): {verdict}.")
        if fvd.lineages and smc.lineages:
            out.append(f"- Distinct lineages at K/2: FVD {fvd.lineages:.1f} vs SMC {smc.lineages:.1f} "
                       f"({fvd.lineages / smc.lineages:.1f}x).")
        out.append(f"- Accuracy: FVD {fvd.accuracy:.3f} vs SMC {smc.accuracy:.3f}; Vendi: FVD {fvd.vendi:.1f} vs "
                   f"SMC {smc.vendi:.1f}.")
    ft, st = s.get("fvd-tuned"), s.get("smc-tuned")
    if ft and st:
        out.append(f"- Tuned against tuned: fvd-tuned FID {ft.fid:.2f} vs smc-tuned {st.fid:.2f} "
                   f"({100 * (ft.fid / st.fid - 1):+.1f}%).")
    ranked = sorted((x for x in summaries if x.group in ("main", "tuned")), key=lambda x: x.fid)
    if ranked:
        out.append("- Ranking by FID (main and tuned rows): " + ", ".join(f"{x.label} {x.fid:.2f}" for x in ranked) + ".")
    real = s.get(REAL_LABEL)
    if real:
        out.append(f"- Floor: real training digits score FID {real.fid:.2f} at this sample count.")
    return out or ["Not enough rows for findings."]


def reproduce_command(cfg: MnistBenchConfig, out_dir: Path) -> str:
    """The command line that reruns (or resumes) exactly this configuration."""
    common = {"device": cfg.device, "batch_size": cfg.batch_size}
    tail = f" --device {cfg.device}" + (f" --batch-size {cfg.batch_size}" if cfg.batch_size is not None else "")
    if cfg == MnistBenchConfig.quick(**common):
        return f"fvd bench mnist --quick{tail} --out {out_dir}"
    if cfg == MnistBenchConfig(**common):
        return f"fvd bench mnist{tail} --out {out_dir}"
    ints = lambda values: ",".join(str(v) for v in values)
    parts = ["fvd bench mnist", f"--classes {ints(cfg.classes)}", f"--seeds {ints(cfg.seeds)}",
             f"--samples-per-class {cfg.samples_per_class}", f"--particles {cfg.n_particles}", f"--steps {cfg.num_steps}",
             f"--svdd-candidates '{ints(cfg.svdd_candidates)}'", f"--dts-rollouts '{ints(cfg.dts_rollout_factors)}'",
             f"--scaling-steps '{ints(cfg.scaling_steps)}'", "--tune" if cfg.tune else "--no-tune",
             f"--device {cfg.device}", f"--out {out_dir}"]
    if cfg.batch_size is not None:
        parts.append(f"--batch-size {cfg.batch_size}")
    return " ".join(parts)
