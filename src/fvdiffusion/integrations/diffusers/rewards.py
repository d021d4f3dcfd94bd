"""Image rewards applied to diffusion samples: decode latents with a pipeline's VAE, or map pixels to [0, 1].

Both wrap an :data:`~fvdiffusion.rewards.image_rewards.ImageReward` (images [B, 3, H, W] in
[0, 1], cond -> [B]) into an engine :class:`~fvdiffusion.rewards.base.Reward` on x̂0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fvdiffusion.integrations.diffusers._batching import check_batch_size, chunks, module_device_dtype
from fvdiffusion.rewards.calling import call_reward, reward_name
from fvdiffusion.rewards.image_rewards import ImageReward


class LatentImageReward:
    """Reward on latents: decodes x̂0 latents with the VAE and applies an image reward.

    ``image_reward(images, cond)`` takes float images [B, 3, H, W] in [0, 1] and returns [B]
    (a list or numpy array is converted); it gets the prompt as a list of B strings when it declares
    ``prompts_as_list = True`` or names its second parameter ``prompts`` (:mod:`fvdiffusion.rewards.calling`).
    The VAE and the reward run in micro-batches of ``batch_size`` (None = all at once);
    ``decodes`` counts the latents decoded so far (rows, not batches).

    ``keep_last = True`` keeps the images of every call since the last :meth:`decode` (a copy,
    whatever the reward does to its input; the engine may call the reward in micro-batches), and
    :meth:`decode` of the same latents returns them instead of decoding again:
    ``align()`` sets it for ``base``, whose only reward call is on the final samples it returns,
    so their returned images are decoded once. Other methods call the reward at every selection
    step; keeping each step's images would hold N decoded images through the run, so their final
    images are decoded a second time (N decodes per prompt).
    """

    def __init__(self, pipe_or_vae: Any, image_reward: ImageReward, batch_size: int | None = None) -> None:
        check_batch_size(batch_size)
        self.vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
        if not hasattr(self.vae, "decode") or not hasattr(self.vae, "config"):
            raise TypeError(f"expected a pipeline with a `vae` or an AutoencoderKL, got {type(pipe_or_vae).__name__}")
        self.image_reward = image_reward
        self.batch_size = batch_size
        self.decodes = 0
        self.name = reward_name(image_reward)
        self.keep_last = False
        self._kept: list[tuple[Tensor, Tensor]] = []  # (latents, their images) of the calls since decode()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (float32, on the latents' device)."""
        kept, self._kept = self._kept, []
        if kept and sum(x.shape[0] for x, _ in kept) == latents.shape[0]:
            seen = torch.cat([x for x, _ in kept])
            if seen.shape == latents.shape and seen.device == latents.device and torch.equal(seen, latents):
                return torch.cat([images for _, images in kept])
        return self._decode(latents)

    def _decode(self, latents: Tensor) -> Tensor:
        device, dtype = module_device_dtype(self.vae)
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        # VAEs flagged force_upcast (SDXL's) overflow in fp16; decode in fp32 as the pipelines do.
        # Plain nn.Module.to: diffusers' override logs a warning on every dtype cast, i.e. every step.
        upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            torch.nn.Module.to(self.vae, torch.float32)
        try:
            images = []
            for s in chunks(latents.shape[0], self.batch_size):
                z = latents[s].to(device, torch.float32 if upcast else dtype) / scaling + shift
                images.append(self.vae.decode(z).sample.float().add(1).div(2).clamp(0, 1))
                self.decodes += z.shape[0]
        finally:
            if upcast:
                torch.nn.Module.to(self.vae, dtype)
        return torch.cat(images).to(latents.device)

    @torch.no_grad()
    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        rewards, kept = [], []
        for s in chunks(x0.shape[0], self.batch_size):
            images = self._decode(x0[s])
            if self.keep_last:
                kept.append(images.clone())  # the reward may write into its input
            rewards.append(call_reward(self.image_reward, images, cond))
        if self.keep_last:
            self._kept.append((x0.detach().clone(), torch.cat(kept)))
        return torch.cat(rewards)


class PixelImageReward:
    """Reward on pixel-space samples in [−1, 1] (e.g. a DDPMPipeline): maps them to [0, 1] images."""

    def __init__(self, image_reward: ImageReward, batch_size: int | None = None) -> None:
        check_batch_size(batch_size)
        self.image_reward = image_reward
        self.batch_size = batch_size
        self.name = reward_name(image_reward)

    @staticmethod
    def decode(x0: Tensor) -> Tensor:
        return x0.float().add(1).div(2).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        rewards = []
        for s in chunks(x0.shape[0], self.batch_size):
            rewards.append(call_reward(self.image_reward, self.decode(x0[s]), cond))
        return torch.cat(rewards)
