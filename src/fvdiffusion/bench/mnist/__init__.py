"""`fvd bench mnist`: every method on class-conditional MNIST, r(x) = log p(c | x̂0), λ = 1.

One job per module: ``methods`` (rows, FK steering's schedule, tuning grids, plan, cell keys),
``config`` (what to run, presets), ``cells`` (sample one cell), ``run`` (resumable schedule,
tuning choice, worker processes), ``scoring`` (FID / KID per feature space with population
bootstrap replicates), ``report`` (results.md), ``plots`` (figures).
"""

from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.mnist.cells import decode_images, encode_images
from fvdiffusion.bench.mnist.config import PRESETS, MnistBenchConfig, preset_name
from fvdiffusion.bench.mnist.methods import (
    REAL_LABEL, PlannedMethod, fk_steering_options, method_rows, plan, population_seed, resolved,
    tuning_families,
)
from fvdiffusion.bench.mnist.report import LabelSummary, mnist_report, reproduce_command, summarise
from fvdiffusion.bench.mnist.run import BenchOutcome, run_mnist_bench
from fvdiffusion.bench.mnist.scoring import Scorer

__all__ = [
    "PRESETS", "REAL_LABEL", "TUNING_SEED", "BenchOutcome", "LabelSummary", "MnistBenchConfig", "PlannedMethod",
    "Scorer", "decode_images", "encode_images", "fk_steering_options", "method_rows", "mnist_report", "plan",
    "population_seed", "preset_name", "reproduce_command", "resolved", "run_mnist_bench", "summarise",
    "tuning_families",
]
