"""The benchmark as one plan over sampler types: its configs, its commands, its output files."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fvdiffusion.bench.truth.config import (
    BASE_SAMPLES, BOOTSTRAP, LAM, PARTICLES, POPULATIONS, QUICK, SAMPLERS, SHARD_SIZE, STEPS, CompareConfig,
    ReferenceConfig, method_specs,
)
from fvdiffusion.bench.truth.outcome import SamplerOutcome, collect, reference_json
from fvdiffusion.bench.truth.report import Commands, truth_report
from fvdiffusion.bench.truth.testbed import TruthTestbed
from fvdiffusion.durable import write_atomically
from fvdiffusion.errors import ConfigError
from fvdiffusion.jsonsafe import strict_json_dumps


@dataclass(frozen=True)
class TruthPlan:
    """What to run: sampler types, the reference's size, the compared populations, the bootstrap."""

    samplers: tuple[str, ...] = tuple(SAMPLERS)
    steps: int = STEPS
    base_samples: int = BASE_SAMPLES
    shard_size: int = SHARD_SIZE
    lam: float = LAM
    n_particles: int = PARTICLES
    populations: int = POPULATIONS
    methods: tuple[str, ...] = ()   # labels of config.METHODS; () = all
    bootstrap: int = BOOTSTRAP
    quick: bool = False
    batch_size: int | None = None

    @classmethod
    def quick_plan(cls, **overrides) -> "TruthPlan":
        q = QUICK
        base = cls(steps=q["steps"], base_samples=q["base_samples"], shard_size=q["shard_size"],
                   n_particles=q["particles"], populations=q["populations"], bootstrap=q["bootstrap"], quick=True)
        return replace(base, **overrides)

    def __post_init__(self) -> None:
        from fvdiffusion.bench.truth.compare import resolved

        if not self.samplers:
            raise ConfigError("invalid samplers=(): expected at least one of " + ", ".join(SAMPLERS))
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 2:
            raise ConfigError(f"invalid bootstrap={self.bootstrap!r}: expected an integer >= 2")
        for sampler in self.samplers:  # every config, every method's included, is valid before anything runs
            self.reference_cfg(sampler)
            cfg = self.compare_cfg(sampler)
            for spec in cfg.methods:
                resolved(spec, cfg, cfg.seeds[0])

    def reference_cfg(self, sampler: str) -> ReferenceConfig:
        return ReferenceConfig(sampler, self.steps, self.base_samples, self.shard_size)

    def compare_cfg(self, sampler: str) -> CompareConfig:
        return CompareConfig(sampler, self.steps, self.lam, self.n_particles, tuple(range(1, self.populations + 1)),
                             method_specs(self.methods or None), self.batch_size)


def reproduce_commands(plan: TruthPlan, out_dir: Path) -> Commands:
    sampler = plan.samplers[0] if len(plan.samplers) == 1 else "both"
    if plan.quick:
        common = f"--sampler {sampler} --quick --out {out_dir}"
        return Commands(f"fvd bench truth --stage reference {common}", f"fvd bench truth --stage compare {common}")
    reference = (f"fvd bench truth --stage reference --sampler {sampler} --steps {plan.steps} "
                 f"--base-samples {plan.base_samples} --shard-size {plan.shard_size} --out {out_dir}")
    methods = f" --methods {','.join(plan.methods)}" if plan.methods else ""
    compare = (f"fvd bench truth --stage compare --sampler {sampler} --steps {plan.steps} --base-samples "
               f"{plan.base_samples} --shard-size {plan.shard_size} --lam {plan.lam:g} --particles {plan.n_particles} "
               f"--populations {plan.populations}{methods} --bootstrap {plan.bootstrap} --out {out_dir}")
    return Commands(reference, compare)


def write_outputs(testbed: TruthTestbed, plan: TruthPlan, out_dir: Path, threads: int) -> tuple[list[SamplerOutcome],
                                                                                                  list[Path]]:
    """Read everything finished for this plan and write results.md and reference.json (atomically)."""
    out_dir = Path(out_dir)
    outcomes = [collect(testbed, plan.reference_cfg(s), plan.compare_cfg(s), out_dir, plan.bootstrap)
                for s in plan.samplers]
    report = truth_report(outcomes, reproduce_commands(plan, out_dir), testbed.name, threads, plan.bootstrap)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.md", out_dir / "reference.json"]
    write_atomically(paths[0], report.encode("utf-8"))
    payload = {"testbed": testbed.name, "lam": plan.lam, "samplers": reference_json(outcomes)}
    write_atomically(paths[1], (strict_json_dumps(payload, indent=1) + "\n").encode("utf-8"))
    return outcomes, paths
