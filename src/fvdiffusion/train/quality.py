"""Unconditional DDPM sample quality as the evaluation network sees it.

Issue bars: of 1,000 samples (50+ steps) at least 85% get a class probability >= 0.9 from
the evaluation network, and the histogram of predicted classes is within total-variation
distance 0.1 of uniform. Sampling is plain DDPM ancestral (DDIM with η = 1), written here
so that this check does not depend on the particle engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.schedule import ddim_step, to_x0_eps

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
    """n samples by DDPM ancestral steps; noise comes from one CPU generator (device-independent).

    ``clip_x0`` clamps each Tweedie estimate to [-1, 1] before the step (a common trick; off
    by default so that this measures the plain sampler the engine's ``base`` method uses).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    schedule = denoiser.schedule
    timesteps = schedule.timesteps(steps).tolist()
    device = _device_of(denoiser)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, *denoiser.sample_shape), generator=generator).to(device)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
            pred = denoiser(x, torch.full((b,), t, dtype=torch.long, device=device))
            est = to_x0_eps(pred, x, ab_t, denoiser.prediction_type)
            x0, eps = est.x0, est.eps
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = (x - ab_t.sqrt().float() * x0) / (1 - ab_t).sqrt().float()
            noise = torch.randn(x.shape, generator=generator).to(device)
            x = ddim_step(x0, eps, ab_t, ab_prev, eta=1.0, noise=noise)
        out.append(x.cpu())
    return torch.cat(out)


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


def _device_of(denoiser: Denoiser) -> torch.device:
    module = getattr(denoiser, "module", None)
    if isinstance(module, nn.Module):
        return next(module.parameters()).device
    return torch.device("cpu")
