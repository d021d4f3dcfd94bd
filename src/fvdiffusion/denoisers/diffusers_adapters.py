"""Adapters from diffusers models and pipelines to the engine's Denoiser and Reward protocols.

The engine does all the stepping from ``alphas_cumprod``; the diffusers scheduler is only
read for its ᾱ table and its ``prediction_type``. A multistep scheduler keeps a history of
past model outputs per sample, which would silently belong to the wrong particle after a
resampling step; taking the table and nothing else makes that impossible.

Nothing here imports diffusers: the adapters work on the objects the user already holds
(duck-typed on their ``config`` attributes), so the only requirement is the extra that
built those objects (``pip install 'fvdiffusion[diffusers]'``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.schedule import PREDICTION_TYPES, VPSchedule

# diffusers' scheduler.config.prediction_type -> the engine's name
_DIFFUSERS_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

ImageReward = Callable[[Tensor, Any], Tensor]  # images [B, 3, H, W] in [0, 1], cond -> [B]


def prediction_type_from_scheduler(scheduler: Any) -> str:
    """The engine's prediction type ("eps", "x0", "v") named by a diffusers scheduler config."""
    name = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if name not in _DIFFUSERS_PREDICTION_TYPES:
        raise ValueError(
            f"scheduler.config.prediction_type={name!r} is not supported; "
            f"expected one of {', '.join(_DIFFUSERS_PREDICTION_TYPES)}"
        )
    return _DIFFUSERS_PREDICTION_TYPES[name]


def schedule_from_scheduler(scheduler_or_alphas_cumprod: Any) -> VPSchedule:
    """A VPSchedule from a diffusers VP scheduler (anything with ``alphas_cumprod``) or a ᾱ tensor."""
    if isinstance(scheduler_or_alphas_cumprod, VPSchedule):
        return scheduler_or_alphas_cumprod
    ac = getattr(scheduler_or_alphas_cumprod, "alphas_cumprod", scheduler_or_alphas_cumprod)
    if not isinstance(ac, Tensor):
        raise TypeError(
            "expected a diffusers scheduler with `alphas_cumprod` (a VP scheduler such as DDPMScheduler "
            f"or DDIMScheduler) or a 1-D alphas_cumprod tensor, got {type(scheduler_or_alphas_cumprod).__name__}"
        )
    return VPSchedule(ac.detach().cpu())


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    step = n if batch_size is None else batch_size
    return [slice(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _sample_size(config: Any) -> tuple[int, int]:
    size = config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class UNet2DModelDenoiser:
    """An unconditional pixel-space ``UNet2DModel`` (e.g. from a ``DDPMPipeline``) as a Denoiser.

    ``scheduler_or_alphas_cumprod``: any diffusers VP scheduler (DDPM, DDIM, PNDM, …) or a ᾱ
    tensor. ``prediction_type`` defaults to the scheduler's (eps when only a tensor is given).
    """

    def __init__(self, unet: torch.nn.Module, scheduler_or_alphas_cumprod: Any, prediction_type: str | None = None) -> None:
        if prediction_type is None:
            prediction_type = prediction_type_from_scheduler(scheduler_or_alphas_cumprod)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule_from_scheduler(scheduler_or_alphas_cumprod)
        self.prediction_type = prediction_type
        self.sample_shape = (unet.config.in_channels, *_sample_size(unet.config))

    @property
    def device(self) -> torch.device:
        return _module_device_dtype(self.unet)[0]

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        device, dtype = _module_device_dtype(self.unet)
        out = self.unet(x_t.to(device, dtype), t.to(device)).sample
        return out.to(x_t.device, x_t.dtype)


class StableDiffusionDenoiser:
    """A text-to-image pipeline built on ``UNet2DConditionModel`` as a Denoiser for one prompt.

    Works for Stable Diffusion 1.x / 2.x (eps or v prediction, read from the pipeline's
    scheduler) and SDXL (its pooled text embedding and size/crop time ids are built once, the
    way the SDXL pipeline builds them for a full-size, uncropped image). The prompt is
    encoded once; every call runs classifier-free guidance
    ε = ε_uncond + g (ε_text − ε_uncond) with the UNet micro-batched by ``batch_size``
    particles (each chunk is 2 × batch_size UNet rows when g > 1).

    ``cond`` passed by the engine may be None or this prompt (so that prompt-aware rewards
    receive it); any other value is an error rather than a silently ignored prompt.
    """

    def __init__(
        self,
        pipe: Any,
        prompt: str,
        negative_prompt: str | None = None,
        guidance_scale: float = 7.5,
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        _check_batch_size(batch_size)
        for attr in ("unet", "vae", "scheduler", "encode_prompt"):
            if not hasattr(pipe, attr):
                raise TypeError(f"{type(pipe).__name__} has no `{attr}`; expected a Stable Diffusion (UNet2DConditionModel) pipeline")
        self.pipe = pipe
        self.unet = pipe.unet
        self.prompt = prompt
        self.guidance_scale = float(guidance_scale)
        self.batch_size = batch_size
        self.schedule = schedule_from_scheduler(pipe.scheduler)
        self.prediction_type = prediction_type_from_scheduler(pipe.scheduler)
        scale = pipe.vae_scale_factor
        default_h, default_w = (s * scale for s in _sample_size(self.unet.config))
        height, width = height or default_h, width or default_w
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {scale}, got {height}x{width}")
        self.sample_shape = (self.unet.config.in_channels, height // scale, width // scale)
        self._encode(negative_prompt, (height, width))

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @torch.no_grad()
    def _encode(self, negative_prompt: str | None, size: tuple[int, int]) -> None:
        """Text embeddings (and SDXL's added conditioning), [uncond; text] stacked when guiding."""
        device, dtype = self.device, self.unet.dtype
        self.added_cond: dict[str, Tensor] = {}
        if getattr(self.pipe, "text_encoder_2", None) is not None or getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                self.prompt, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=self.do_cfg, negative_prompt=negative_prompt,
            )
            proj_dim = int(pooled.shape[-1])
            time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype, text_encoder_projection_dim=proj_dim).to(device)
            if self.do_cfg:
                pooled = torch.cat([neg_pooled, pooled])
                time_ids = torch.cat([time_ids, time_ids])
            self.added_cond = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        else:
            pos, neg = self.pipe.encode_prompt(
                self.prompt, device, 1, self.do_cfg, negative_prompt=negative_prompt,
            )
        self.text_embeds = (torch.cat([neg, pos]) if self.do_cfg else pos).to(dtype)

    def _unet(self, x: Tensor, t: Tensor) -> Tensor:
        """One guided prediction for a chunk of particles."""
        n = x.shape[0]
        copies = 2 if self.do_cfg else 1
        x_in = torch.cat([x] * copies)
        t_in = torch.cat([t] * copies)
        embeds = self.text_embeds.repeat_interleave(n, dim=0)
        added = {k: v.repeat_interleave(n, dim=0) for k, v in self.added_cond.items()}
        out = self.unet(x_in, t_in, encoder_hidden_states=embeds, added_cond_kwargs=added or None).sample
        if not self.do_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is not None and not (isinstance(cond, str) and cond == self.prompt):
            raise ValueError(f"cond {cond!r} differs from the prompt this denoiser encoded ({self.prompt!r}); make one denoiser per prompt")
        device, dtype = self.device, self.unet.dtype
        x, tt = x_t.to(device, dtype), t.to(device)
        outs = [self._unet(x[s], tt[s]) for s in _chunks(x.shape[0], self.batch_size)]
        return torch.cat(outs).to(x_t.device, x_t.dtype)


class LatentImageReward:
    """Reward on latents: decodes x̂0 latents with the VAE and applies an image reward.

    ``image_reward(images, cond)`` takes float images [B, 3, H, W] in [0, 1] and returns [B].
    The VAE and the reward run in micro-batches of ``batch_size`` (None = all at once);
    ``decodes`` counts the latents decoded so far (rows, not batches).
    """

    def __init__(self, pipe_or_vae: Any, image_reward: ImageReward, batch_size: int | None = None) -> None:
        _check_batch_size(batch_size)
        self.vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
        if not hasattr(self.vae, "decode") or not hasattr(self.vae, "config"):
            raise TypeError(f"expected a pipeline with a `vae` or an AutoencoderKL, got {type(pipe_or_vae).__name__}")
        self.image_reward = image_reward
        self.batch_size = batch_size
        self.decodes = 0
        self.name = getattr(image_reward, "name", type(image_reward).__name__)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (float32, on the latents' device)."""
        device, dtype = _module_device_dtype(self.vae)
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        # VAEs flagged force_upcast (SDXL's) overflow in fp16; decode in fp32 as the pipelines do.
        # Plain nn.Module.to: diffusers' override logs a warning on every dtype cast, i.e. every step.
        upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            torch.nn.Module.to(self.vae, torch.float32)
        try:
            images = []
            for s in _chunks(latents.shape[0], self.batch_size):
                z = latents[s].to(device, torch.float32 if upcast else dtype) / scaling + shift
                images.append(self.vae.decode(z).sample.float().add(1).div(2).clamp(0, 1))
                self.decodes += z.shape[0]
        finally:
            if upcast:
                torch.nn.Module.to(self.vae, dtype)
        return torch.cat(images).to(latents.device)

    @torch.no_grad()
    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        rewards = []
        for s in _chunks(x0.shape[0], self.batch_size):
            rewards.append(self.image_reward(self.decode(x0[s]), cond).to(x0.device))
        return torch.cat(rewards)


class PixelImageReward:
    """Reward on pixel-space samples in [−1, 1] (e.g. a DDPMPipeline): maps them to [0, 1] images."""

    def __init__(self, image_reward: ImageReward, batch_size: int | None = None) -> None:
        _check_batch_size(batch_size)
        self.image_reward = image_reward
        self.batch_size = batch_size
        self.name = getattr(image_reward, "name", type(image_reward).__name__)

    @staticmethod
    def decode(x0: Tensor) -> Tensor:
        return x0.float().add(1).div(2).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        rewards = []
        for s in _chunks(x0.shape[0], self.batch_size):
            rewards.append(self.image_reward(self.decode(x0[s]), cond).to(x0.device))
        return torch.cat(rewards)
