"""Unconditional DDPM sample quality as the evaluation network sees it.

Issue bars: of 1,000 samples (50+ steps) at least 85% get a class probability >= 0.9 from
the evaluation network, and the histogram of predicted classes is within total-variation
distance 0.1 of uniform. Sampling is the engine's ``base`` method with η = 1 (DDPM ancestral:
DDIM(1) on the engine's step grid), so the check measures the very sampler every method builds on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from fvdiffusion.api import sample
from fvdiffusion.denoisers.base import Denoiser

CONFIDENT_FRACTION_BAR = 0.85
TV_BAR = 0.1


@dataclass(frozen=True)
class QualityReport:
    n: int
    steps: int
    seed: int
    threshold: float
    confident_fraction: float  # share of samples with max class probability >= threshold
    class_histogram: list[int]  # eval-net argmax counts, classes 0..9
    tv_to_uniform: float
    mean_max_prob: float
    wall_s: float

    @property
    def meets_bars(self) -> bool:
        return self.confident_fraction >= CONFIDENT_FRACTION_BAR and self.tv_to_uniform <= TV_BAR

    def to_dict(self) -> dict:
        return {**asdict(self), "meets_bars": self.meets_bars}


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    n: int,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 250,
    clip_x0: bool = False,
) -> Tensor:
    """n samples [n, *sample_shape] (on the CPU) from the engine's ``base`` method: ``steps`` DDPM steps.

    One engine run, ``fvdiffusion.api.sample("base", denoiser, n_particles=n, num_steps=steps,
    seed=seed, eta=1.0, batch_size=batch_size)``: ``batch_size`` is the engine's micro-batch, so it
    bounds the denoiser's memory (the population itself is n samples) and never changes the
    samples; the seed alone fixes them, on a given device (the noise is drawn by the engine's
    generator on the denoiser's device). ``clip_x0`` clamps each Tweedie estimate x̂0 to [-1, 1]
    before the step (the engine's ``clip_x0=1.0``; off by default so that this measures the plain
    sampler). Run in this process only (``sharded=False``), even inside a process group.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    result = sample("base", denoiser, n_particles=n, num_steps=steps, seed=seed, eta=1.0, batch_size=batch_size,
                    clip_x0=1.0 if clip_x0 else None, sharded=False)
    return result.samples.cpu()


@torch.no_grad()
def ddpm_quality(
    denoiser: Denoiser,
    eval_net: nn.Module,
    n: int = 1000,
    steps: int = 50,
    seed: int = 0,
    threshold: float = 0.9,
    batch_size: int = 250,
    clip_x0: bool = False,
) -> QualityReport:
    start = time.perf_counter()
    samples = sample_ddpm(denoiser, n, steps, seed, batch_size, clip_x0).clamp(-1, 1)
    probs = class_probabilities(eval_net, samples)
    max_prob, predicted = probs.max(dim=1)
    histogram = torch.bincount(predicted, minlength=probs.shape[1])
    tv = 0.5 * (histogram.double() / n - 1.0 / probs.shape[1]).abs().sum().item()
    return QualityReport(
        n=n,
        steps=steps,
        seed=seed,
        threshold=threshold,
        confident_fraction=(max_prob >= threshold).double().mean().item(),
        class_histogram=histogram.tolist(),
        tv_to_uniform=tv,
        mean_max_prob=max_prob.double().mean().item(),
        wall_s=round(time.perf_counter() - start, 2),
    )


@torch.no_grad()
def class_probabilities(classifier: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    device = next(classifier.parameters()).device
    chunks = [classifier(images[i:i + batch_size].to(device)).softmax(-1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)

