"""``align()``: reward-align the samples of a diffusers pipeline in one call.

    result = fvdiffusion.align(pipe, "a red bicycle", reward, method="fvd", n_particles=8)
    result.images[0]  # the highest-reward image

The pipeline is used as it is (no forked pipeline): its UNet and text encoders become a
Denoiser, its VAE decodes x̂0 latents for the image reward, and the engine does the
stepping from the scheduler's ᾱ table. Supported: unconditional pixel pipelines built on
``UNet2DModel`` (e.g. ``DDPMPipeline``, no prompt) and text-to-image pipelines built on
``UNet2DConditionModel`` with a VAE (Stable Diffusion 1.x / 2.x, SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.api import sample
from fvdiffusion.errors import UnsupportedPipelineError
from fvdiffusion.integrations.diffusers.denoisers import StableDiffusionDenoiser, UNet2DModelDenoiser
from fvdiffusion.integrations.diffusers.rewards import LatentImageReward, PixelImageReward
from fvdiffusion.loop import StepEvent
from fvdiffusion.result import SampleResult
from fvdiffusion.rewards.image_rewards import ImageReward
from fvdiffusion.rewards.model_rewards import require


@dataclass
class AlignResult:
    """Images ranked by final reward (best first) and the full engine result.

    ``ranking[i]`` is the index in ``result.samples`` (and in the lineage) of ``images[i]``.
    """

    images: list[Any]      # PIL.Image.Image, best first
    rewards: Tensor        # [N] final rewards in the order of ``images``
    ranking: Tensor        # [N] long
    result: SampleResult


def build_adapters(
    pipe: Any,
    prompt: str | None,
    reward: ImageReward,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    batch_size: int | None = None,
) -> tuple[Any, LatentImageReward | PixelImageReward]:
    """The Denoiser and the x̂0 reward for ``pipe``; raises a clear error for unsupported pipelines."""
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "scheduler"):
        raise UnsupportedPipelineError(
            f"{name} is not supported: align() needs a pipeline with a `unet` and a VP `scheduler` "
            "(flow-matching transformer pipelines such as SD3 or FLUX are not supported yet)"
        )
    if hasattr(pipe, "encode_prompt") and getattr(pipe, "vae", None) is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"{name} is a text-to-image pipeline: pass the prompt as a string, got {prompt!r}")
        denoiser = StableDiffusionDenoiser(pipe, prompt, negative_prompt, guidance_scale, batch_size)
        return denoiser, LatentImageReward(pipe, reward, batch_size)
    if getattr(pipe, "vae", None) is None and getattr(pipe, "vqvae", None) is None:
        if prompt is not None:
            raise ValueError(f"{name} is unconditional: pass prompt=None")
        return UNet2DModelDenoiser(unet, pipe.scheduler), PixelImageReward(reward, batch_size)
    raise UnsupportedPipelineError(f"{name} is not supported: expected an unconditional UNet2DModel pipeline or a Stable Diffusion pipeline")


def to_pil(images: Tensor) -> list[Any]:
    """Float images [B, 3, H, W] in [0, 1] -> PIL RGB images."""
    image_module = require("PIL.Image", "plot")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [image_module.fromarray(p) for p in pixels]


def rank_by_reward(rewards: Tensor) -> Tensor:
    """Indices sorting rewards best first; NaN / −inf rewards go last."""
    clean = torch.where(torch.isnan(rewards), torch.full_like(rewards, -float("inf")), rewards)
    return torch.sort(clean, descending=True, stable=True).indices


def align(
    pipe: Any,
    prompt: str | None,
    reward: ImageReward,
    method: str = "fvd",
    n_particles: int = 8,
    num_inference_steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
    progress: bool = False,
    callback: Callable[[StepEvent], Any] | None = None,
    **method_options: Any,
) -> AlignResult:
    """Sample ``n_particles`` images from ``pipe`` with ``method`` steering towards ``reward``.

    ``reward(images, prompt)`` takes float images [B, 3, H, W] in [0, 1] and returns [B]
    (see ``fvdiffusion.rewards.image_rewards`` / ``model_rewards``). ``batch_size``
    micro-batches the UNet, the VAE and the reward (results do not depend on it).
    ``method_options`` go to :func:`fvdiffusion.sample` (e.g. ``lam``, ``eta``,
    ``rebirth_noise``). ``result.cost.extra["vae_decodes"]`` counts every latent decoded,
    the final decode for the returned images included. ``callback`` observes every step
    (a :class:`~fvdiffusion.loop.StepEvent` with the latents; see :func:`fvdiffusion.sample`).
    """
    denoiser, latent_reward = build_adapters(pipe, prompt, reward, guidance_scale, negative_prompt, batch_size)
    result = sample(
        method=method, denoiser=denoiser, reward=latent_reward, n_particles=n_particles,
        num_steps=num_inference_steps, seed=seed, cond=prompt, batch_size=batch_size, progress=progress,
        callback=callback, **method_options,
    )
    images = latent_reward.decode(result.samples)
    if isinstance(latent_reward, LatentImageReward):
        result.cost.extra["vae_decodes"] = latent_reward.decodes
    ranking = rank_by_reward(result.rewards)
    pil = to_pil(images)
    return AlignResult(images=[pil[i] for i in ranking.tolist()], rewards=result.rewards[ranking],
                       ranking=ranking, result=result)
