"""diffusers UNets as Denoisers: unconditional pixel ``UNet2DModel`` and text-to-image ``UNet2DConditionModel``.

The engine does all the stepping from ``alphas_cumprod``; the diffusers scheduler is only
read for its ᾱ table and its ``prediction_type``. A multistep scheduler keeps a history of
past model outputs per sample, which would silently belong to the wrong particle after a
resampling step; taking the table and nothing else makes that impossible.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fvdiffusion.integrations.diffusers._batching import check_batch_size, chunks, module_device_dtype
from fvdiffusion.schedule import PREDICTION_TYPES, VPSchedule

# diffusers' scheduler.config.prediction_type -> the engine's name
_DIFFUSERS_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# ᾱ_T of a zero-terminal-SNR schedule, clamped as diffusers' Euler schedulers clamp it
ZERO_SNR_ALPHA_BAR = 2.0**-24


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
    """A VPSchedule from a diffusers VP scheduler (anything with ``alphas_cumprod``) or a ᾱ tensor.

    ᾱ values below 2**-24 (the exact 0 of a zero-terminal-SNR schedule) are raised to 2**-24.
    """
    if isinstance(scheduler_or_alphas_cumprod, VPSchedule):
        return scheduler_or_alphas_cumprod
    ac = getattr(scheduler_or_alphas_cumprod, "alphas_cumprod", scheduler_or_alphas_cumprod)
    if not isinstance(ac, Tensor):
        raise TypeError(
            "expected a diffusers scheduler with `alphas_cumprod` (a VP scheduler such as DDPMScheduler "
            f"or DDIMScheduler) or a 1-D alphas_cumprod tensor, got {type(scheduler_or_alphas_cumprod).__name__}"
        )
    # A zero-terminal-SNR schedule (rescale_betas_zero_snr=True) has ᾱ_T = 0 exactly, where an eps
    # prediction cannot give x̂0: clamp it the way diffusers' Euler schedulers do (2**-24, the smallest
    # positive float16 subnormal). Every other entry of a real schedule lies far above it.
    return VPSchedule(ac.detach().cpu().double().clamp(min=ZERO_SNR_ALPHA_BAR))


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
        return module_device_dtype(self.unet)[0]

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        device, dtype = module_device_dtype(self.unet)
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
        check_batch_size(batch_size)
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
        out = self._predict(x_in, t_in, embeds, added or None)
        if not self.do_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def _predict(self, x_in: Tensor, t_in: Tensor, embeds: Tensor, added: dict[str, Tensor] | None) -> Tensor:
        """The UNet on the (CFG-doubled) rows; subclasses add conditioning here."""
        return self.unet(x_in, t_in, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is not None and not (isinstance(cond, str) and cond == self.prompt):
            raise ValueError(f"cond {cond!r} differs from the prompt this denoiser encoded ({self.prompt!r}); make one denoiser per prompt")
        device, dtype = self.device, self.unet.dtype
        x, tt = x_t.to(device, dtype), t.to(device)
        outs = [self._unet(x[s], tt[s]) for s in chunks(x.shape[0], self.batch_size)]
        return torch.cat(outs).to(x_t.device, x_t.dtype)


class ControlNetDenoiser(StableDiffusionDenoiser):
    """``StableDiffusionControlNetPipeline`` as a Denoiser: :class:`StableDiffusionDenoiser` whose every UNet call
    gets the residuals of the pipeline's single ``ControlNetModel`` run on the same rows, as the pipeline does it
    (guess_mode off, control_guidance_start 0 / end 1): the ControlNet sees the CFG-doubled latents, timesteps and
    text embeddings with the control image repeated for every row (both halves), and its down / mid residuals,
    scaled by ``conditioning_scale``, go to the UNet's ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``.

    ``control_image``: the preprocessed control image [1, 3, H, W] (``pipe.control_image_processor``, in [0, 1]);
    its size decides the sample size.
    """

    def __init__(
        self,
        pipe: Any,
        prompt: str,
        control_image: Tensor,
        conditioning_scale: float = 1.0,
        negative_prompt: str | None = None,
        guidance_scale: float = 7.5,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(control_image, Tensor) or control_image.ndim != 4 or control_image.shape[0] != 1:
            raise ValueError("control_image must be one preprocessed image of shape [1, 3, H, W]")
        height, width = int(control_image.shape[-2]), int(control_image.shape[-1])
        super().__init__(pipe, prompt, negative_prompt, guidance_scale, batch_size, height, width)
        self.controlnet = pipe.controlnet
        self.conditioning_scale = float(conditioning_scale)
        self.control_image = control_image.to(self.device, self.controlnet.dtype)

    def _predict(self, x_in: Tensor, t_in: Tensor, embeds: Tensor, added: dict[str, Tensor] | None) -> Tensor:
        control = self.control_image.expand(x_in.shape[0], *self.control_image.shape[1:])
        down, mid = self.controlnet(x_in, t_in, encoder_hidden_states=embeds, controlnet_cond=control,
                                    conditioning_scale=self.conditioning_scale, guess_mode=False, return_dict=False)
        return self.unet(x_in, t_in, encoder_hidden_states=embeds, added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
