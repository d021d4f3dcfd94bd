"""Run one cell: sample its populations (or pick real digits) and store what the report needs.

A row stores every population's samples as uint8 pixels, zlib-compressed and base64-encoded
(784 bytes per digit before compression, about 210 after). Why images and not features: any
feature space, including one added after the run, can be scored at report time, and the
bootstrap needs per-population features anyway (a population's mean and covariance would be
larger than its pixels at d = 96). Quantising to uint8 puts samples on the same grid as the
real digits, which are uint8 too. Scoring (FID, KID, accuracy) happens in ``scoring``; the run
also stores each cell's scores in its row, so with ``store_images=False`` (the GPU preset,
whose images would make a file of about 100 MB) a row keeps only a preview of its samples.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import replace
from typing import Any

import torch

import fvdiffusion as fv
from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.mnist.config import MnistBenchConfig
from fvdiffusion.bench.mnist.methods import (
    population_seed, populations, resolved, samples_per_population, sampler_config,
)
from fvdiffusion.result import distinct_rows

IMAGE_SHAPE = (1, 28, 28)


def encode_images(images: torch.Tensor) -> str:
    """[n, 1, 28, 28] in [-1, 1] -> base64 of the zlib-compressed uint8 pixels."""
    from fvdiffusion.bench.common.images import to_uint8

    return base64.b64encode(zlib.compress(to_uint8(images).numpy().tobytes(), 6)).decode("ascii")


def decode_images(text: str) -> torch.Tensor:
    """Inverse of :func:`encode_images`: [n, 1, 28, 28] float32 in [-1, 1]."""
    pixels = torch.frombuffer(bytearray(zlib.decompress(base64.b64decode(text))), dtype=torch.uint8)
    return pixels.float().reshape(-1, *IMAGE_SHAPE) / 127.5 - 1.0


class SamplingModels:
    """What sampling needs on one device: the DDPM, the reward classifier, the real train digits."""

    def __init__(self, device: str) -> None:
        from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier
        from fvdiffusion.zoo.mnist_data import load_mnist

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        self.device = device
        self.ddpm = load_ddpm(device=device)
        self.reward_classifier = load_reward_classifier(device=device)
        self._train = load_mnist("train")

    def real_digits(self, cls: int, n: int, seed: int) -> torch.Tensor:
        """``n`` distinct training digits of class ``cls`` (fewer if the class has fewer), in a seeded order."""
        images = self._train.images[self._train.labels == cls]
        pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return images[pick]


PREVIEW_IMAGES = 16  # kept in every row for the sample figure, even without the populations' images


def _population_record(samples: torch.Tensor, rewards: torch.Tensor, diversity: dict[str, int | None],
                       slot_lineages: int | None) -> dict[str, Any]:
    finite = rewards[torch.isfinite(rewards)]
    return {"n": int(samples.shape[0]), "images": encode_images(samples),
            "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            **diversity, "slot_lineages": slot_lineages}


def _real_populations(models: SamplingModels, reward, cls: int, seed: int, n_pop: int,
                      per_pop: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The real row: distinct train digits split into populations like a sampler's (fewer if the class is short)."""
    digits = models.real_digits(cls, n_pop * per_pop, population_seed(seed, cls, 0))
    size = digits.shape[0] // n_pop
    out = []
    for p in range(n_pop):
        chunk = digits[p * size: (p + 1) * size]
        rewards = reward(chunk.to(models.device)).double().cpu()
        distinct = int(distinct_rows(chunk).numel())
        # independent real digits: ancestry does not apply
        out.append(_population_record(chunk, rewards, {"distinct_samples": distinct, "distinct_midpoint_ancestors": None,
                                                       "distinct_roots": None}, None))
    return out, digits[:size]


def run_cell(models: SamplingModels, spec: MethodSpec, cls: int, seed: int, cfg: MnistBenchConfig,
             tuning: bool = False) -> dict[str, Any]:
    """Sample (or, for the real row, pick) every population of the cell; return its JSONL row."""
    from fvdiffusion.rewards.classifier import ClassifierReward

    reward = ClassifierReward(models.reward_classifier, cls)
    n_pop = populations(spec, cfg, tuning)
    keep = samples_per_population(spec, cfg)
    records, curves, first = [], [], None
    calls = {"denoiser_calls": 0, "reward_calls": 0, "wall_seconds": 0.0}
    if spec.method == "real":
        records, first = _real_populations(models, reward, cls, seed, n_pop, cfg.n_particles)
    for p in range(n_pop if spec.method != "real" else 0):
        config = replace(sampler_config(spec, seed, cfg), seed=population_seed(seed, cls, p))
        res = fv.sample(spec.method, models.ddpm, reward, config=config)
        if spec.method == "bon" and keep < res.samples.shape[0]:
            # best-of-N keeps its top k: independent particles, so each kept distinct sample is its own root
            kept, rewards = res.extras["top_k_samples"][:keep], res.rewards[:keep]
            distinct = int(distinct_rows(kept).numel())
            diversity = {"distinct_samples": distinct, "distinct_midpoint_ancestors": distinct, "distinct_roots": distinct}
        else:  # a population larger than the cell's sample count keeps its first slots
            kept, rewards, diversity = res.samples[:keep], res.rewards[:keep], res.diversity().as_dict()
        records.append(_population_record(kept, rewards.double().cpu(), diversity, res.distinct_lineages()))
        first = kept if first is None else first
        curves.append(res.lineage.genealogy_curve())
        calls["denoiser_calls"] += res.cost.denoiser_calls
        calls["reward_calls"] += res.cost.reward_calls
        calls["wall_seconds"] += res.cost.wall_seconds
    return {
        "class": cls, "seed": seed, "resolved": resolved(spec, seed, cfg, tuning), "label": spec.label,
        "method": spec.method, "options": spec.options, "populations": n_pop,
        "n_samples": sum(r["n"] for r in records), "per_population": records,
        "preview": encode_images(first[:PREVIEW_IMAGES]),
        "genealogy": torch.tensor(curves, dtype=torch.float64).mean(0).tolist() if curves else None,
        **calls, "device": models.device, "threads": torch.get_num_threads(),
    }


def without_images(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its populations' images dropped (its preview stays)."""
    return {**row, "per_population": [{k: v for k, v in p.items() if k != "images"} for p in row["per_population"]]}


def has_images(row: dict[str, Any]) -> bool:
    return all("images" in p for p in row["per_population"])


def population_images(row: dict[str, Any]) -> list[torch.Tensor]:
    return [decode_images(p["images"]) for p in row["per_population"]]
