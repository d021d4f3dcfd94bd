"""The ground-truth benchmark's settings, declared before any reference or population ran.

- K = 20 steps (not the 50 of other benchmarks): 20,000 base samples per sampler type then cost
  about 20,000 x 20 UNet rows, roughly 30-40 min on one CPU thread.
- λ = 20 on the mean-ink reward (r ≈ 0.13 ± 0.04): chosen on a 250-sample pilot per sampler type
  (seed 12345, not a reference shard or a population) so that the tilt moves the reward mean by
  about one base standard deviation while the SNIS effective sample size stays near 0.3-0.45 n,
  far above the required 2,000 of 20,000. The report states both as measured on the reference.
- The compared methods are :data:`METHODS` (label -> (method, options)); adding a row is one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.common.protocol import check_reported_seeds
from fvdiffusion.errors import ConfigError

SAMPLERS: dict[str, float] = {"ddpm": 1.0, "ddim": 0.0}  # name -> DDIM η
LAM = 20.0
STEPS = 20
BASE_SAMPLES = 20_000
SHARD_SIZE = 250
PARTICLES = 128
POPULATIONS = 16          # reported seeds 1 … P; seed 0 is the tuning seed and is never run here
BOOTSTRAP = 1000
MIN_ESS = 2000            # the reference is trusted when its SNIS effective sample size reaches this
MIN_SHIFT = 0.5           # ... and the tilt moves the reward mean by at least this many base stds
SHARD_SEED_OFFSET = 1_000_000  # base shards never share a seed with a population (1 … P) or the tuning seed

QUICK = dict(steps=2, base_samples=200, shard_size=100, particles=16, populations=2, bootstrap=200)

# label -> (method, options). Every population method at its defaults, and the ablations asked for.
METHODS: dict[str, tuple[str, dict]] = {
    "base": ("base", {}),
    "smc-multinomial": ("smc", {"scheme": "multinomial"}),
    "smc-systematic": ("smc", {"scheme": "systematic"}),
    "vasr": ("vasr", {}),
    "fvd": ("fvd", {}),
    "fvd-nu0": ("fvd", {"rebirth_noise": 0.0}),
    "fvd-systematic": ("fvd", {"parent_allocation": "systematic"}),
}


def method_specs(labels: tuple[str, ...] | None = None) -> tuple[MethodSpec, ...]:
    """The specs of ``labels`` (all of :data:`METHODS` when None), in the order given."""
    from fvdiffusion.config import did_you_mean

    labels = tuple(METHODS) if labels is None else labels
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise ConfigError(f"invalid method {unknown[0]!r}{did_you_mean(unknown[0], METHODS)}: expected some of "
                          f"{', '.join(METHODS)}")
    return tuple(MethodSpec(label, *METHODS[label]) for label in labels)


def check_sampler(sampler: str) -> float:
    """The η of a sampler type name."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"invalid sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"invalid {name}={value!r}: expected an integer >= {minimum}")


@dataclass(frozen=True)
class ReferenceConfig:
    """The base sample of one sampler type: ``base_samples`` draws in shards of ``shard_size``."""

    sampler: str
    steps: int = STEPS
    base_samples: int = BASE_SAMPLES
    shard_size: int = SHARD_SIZE

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        _positive("steps", self.steps)
        _positive("base_samples", self.base_samples, 2)
        _positive("shard_size", self.shard_size)

    @property
    def eta(self) -> float:
        return SAMPLERS[self.sampler]

    @property
    def n_shards(self) -> int:
        return -(-self.base_samples // self.shard_size)

    def shard_n(self, index: int) -> int:
        """Samples in shard ``index``: full shards, the last one holding what is left."""
        return min(self.shard_size, self.base_samples - index * self.shard_size)


@dataclass(frozen=True)
class CompareConfig:
    """Populations of every method at the reference's K and λ, on reported seeds only."""

    sampler: str
    steps: int = STEPS
    lam: float = LAM
    n_particles: int = PARTICLES
    seeds: tuple[int, ...] = tuple(range(1, POPULATIONS + 1))
    methods: tuple[MethodSpec, ...] = field(default_factory=method_specs)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        _positive("steps", self.steps)
        _positive("n_particles", self.n_particles, 2)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam < float("inf"):
            raise ConfigError(f"invalid lam={self.lam!r}: expected a finite number >= 0")
        if not self.seeds:
            raise ConfigError("invalid seeds=(): expected at least one reported seed")
        check_reported_seeds(self.seeds)
        if not self.methods:
            raise ConfigError("invalid methods=(): expected at least one method")

    @property
    def eta(self) -> float:
        return SAMPLERS[self.sampler]
