"""Flow-matching pipelines (Stable Diffusion 3, FLUX) as Denoisers, through the VP view of their velocity.

SD3's ``SD3Transformer2DModel`` and FLUX's ``FluxTransformer2DModel`` predict the velocity
v = ε − x0 of x_t = (1 − t) x0 + t ε. :class:`SD3Denoiser` and :class:`FluxDenoiser` wrap them in
:class:`~fvdiffusion.denoisers.flow_matching.FlowMatchingDenoiser`, so every method of the engine
(selection, rebirth, candidates, trees) runs on them unchanged:

    den = SD3Denoiser(pipe, "a red bicycle", num_inference_steps=28, guidance_scale=7.0)
    res = fv.sample("fvd", den, LatentImageReward(pipe, reward), n_particles=8,
                    num_steps=den.num_inference_steps, grid=den.grid, eta=1.0)

The timestep table is exactly what the pipeline's scheduler chooses for ``num_inference_steps``
(``set_timesteps`` on a copy, with its ``shift``, or FLUX's resolution-dependent ``mu`` and
sigmas), so ``method="base"`` with η = 0 reproduces ``pipe(..., output_type="latent")``: the
engine's DDIM(0) step in the VP view *is* FlowMatchEulerDiscreteScheduler's Euler step. η = 1 is
the marginal-preserving SDE that selection and rebirth need. Prompts are encoded once by the
pipeline's own ``encode_prompt``; SD3 runs classifier-free guidance, FLUX its guidance embedding
(and true CFG when ``true_cfg_scale > 1`` with a negative prompt). FLUX's latents stay unpacked
([C, H/8, W/8]) in the engine, so :class:`~fvdiffusion.integrations.diffusers.rewards.LatentImageReward`
decodes them as it does SD's; they are packed into 2×2 patches for each transformer call.

Nothing here imports diffusers at import time; the pipelines' own helpers (``calculate_shift``,
``_pack_latents``) are taken from the objects the user passes.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fvdiffusion.denoisers.flow_matching import FlowMatchingDenoiser, flow_scale
from fvdiffusion.errors import SchedulerReplacedWarning, UnsupportedPipelineError
from fvdiffusion.integrations.diffusers._batching import check_batch_size, chunks
from fvdiffusion.schedule import StepGrid

SD3_PIPELINES = frozenset({"StableDiffusion3Pipeline"})
FLUX_PIPELINES = frozenset({"FluxPipeline"})
_EULER = "FlowMatchEulerDiscreteScheduler"

__all__ = ["SD3Denoiser", "FluxDenoiser", "flow_times_from_scheduler", "flow_denoiser_for", "is_flow_pipeline",
           "SD3_PIPELINES", "FLUX_PIPELINES"]


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def is_flow_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is a pipeline built on SD3's or FLUX's flow-matching transformer."""
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and bool(_class_names(transformer) & {"SD3Transformer2DModel", "FluxTransformer2DModel"})


def _check_pipeline(pipe: Any, supported: frozenset[str], what: str) -> None:
    name = type(pipe).__name__
    if name not in supported:
        hint = " (its image / mask / control inputs would be dropped)" if is_flow_pipeline(pipe) else ""
        raise UnsupportedPipelineError(
            f"{name} is not supported by {what}{hint}; supported: {', '.join(sorted(SD3_PIPELINES | FLUX_PIPELINES))} "
            "(text-to-image)")


def flow_times_from_scheduler(
    scheduler: Any, num_inference_steps: int, *, sigmas: Sequence[float] | None = None, mu: float | None = None,
) -> Tensor:
    """The flow times (increasing, float64 holding diffusers' float32 values) that ``scheduler.set_timesteps``
    chooses for ``num_inference_steps`` (with ``sigmas`` / ``mu`` as the pipeline passes them).

    Runs on a fresh copy of the scheduler; the scheduler must follow FlowMatchEulerDiscreteScheduler's
    convention (``timesteps = sigmas · num_train_timesteps``, sigmas decreasing to a final 0).
    """
    name = type(scheduler).__name__
    if not hasattr(scheduler, "set_timesteps") or not hasattr(getattr(scheduler, "config", None), "num_train_timesteps"):
        raise TypeError(f"expected a diffusers flow-matching scheduler (e.g. {_EULER}), got {name}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if getattr(scheduler.config, "invert_sigmas", False):
        raise UnsupportedPipelineError(f"{name} with invert_sigmas=True is not supported (not the x_t = (1 − t) x0 + t ε path)")
    fresh = type(scheduler).from_config(scheduler.config)
    kwargs: dict[str, Any] = {}
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    if mu is not None:
        kwargs["mu"] = mu
    try:
        fresh.set_timesteps(None if sigmas is not None else num_inference_steps, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}.set_timesteps({num_inference_steps}) failed: {exc}".splitlines()[0]) from exc
    sig = getattr(fresh, "sigmas", None)
    steps = getattr(fresh, "timesteps", None)
    if not isinstance(sig, Tensor) or not isinstance(steps, Tensor) or sig.numel() != steps.numel() + 1:
        raise UnsupportedPipelineError(f"{name} does not expose sigmas and timesteps the way {_EULER} does")
    sig32 = sig[:-1].detach().cpu().float()
    T = scheduler.config.num_train_timesteps
    if float(sig[-1]) != 0.0 or not torch.equal(steps.detach().cpu().float(), sig32 * T):
        raise UnsupportedPipelineError(
            f"{name}: expected timesteps = sigmas * {T} ending on sigma 0 (the flow-matching Euler convention)")
    if not bool(torch.all(sig32[1:] < sig32[:-1])):
        raise UnsupportedPipelineError(f"{name}.set_timesteps repeats or reorders sigmas (a higher-order solver?); "
                                       f"use {_EULER}")
    if len(sig32) != num_inference_steps:
        raise ValueError(f"got {len(sig32)} sigmas for num_inference_steps={num_inference_steps}")
    return sig32.double().flip(0)


class _FlowPipelineDenoiser(FlowMatchingDenoiser):
    """What SD3 and FLUX share: the scheduler's table, the prompt check, micro-batching, the grid."""

    def __init__(self, pipe: Any, prompt: str, num_inference_steps: int, sigmas: Any, mu: float | None,
                 batch_size: int | None, sample_shape: tuple[int, ...]) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        check_batch_size(batch_size)
        scheduler = pipe.scheduler
        if _EULER not in _class_names(scheduler):
            warnings.warn(f"{type(scheduler).__name__}'s stepping is replaced by the engine's DDIM(eta) in the VP view "
                          f"(eta=0 is {_EULER}'s Euler step); only its timesteps are used", SchedulerReplacedWarning,
                          stacklevel=3)
        elif getattr(scheduler.config, "stochastic_sampling", False):
            warnings.warn(f"{_EULER}(stochastic_sampling=True) is replaced by the engine's DDIM(eta) in the VP view "
                          "(eta=1: the marginal-preserving SDE)", SchedulerReplacedWarning, stacklevel=3)
        times = flow_times_from_scheduler(scheduler, num_inference_steps, sigmas=sigmas, mu=mu)
        super().__init__(self._velocity, times, sample_shape)
        self.pipe = pipe
        self.prompt = prompt
        self.batch_size = batch_size
        self.num_inference_steps = num_inference_steps
        self._train_steps = scheduler.config.num_train_timesteps

    @property
    def grid(self) -> StepGrid:
        """The pipeline's own steps: every entry of the table, from the first sigma down, then clean data."""
        return self.step_grid(self.num_inference_steps)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def initial_state(self, latents: Tensor) -> Tensor:
        """The engine's VP state for the pipeline's initial ``latents`` at its first sigma (x̃ = x_t / c(t))."""
        return latents / float(flow_scale(self.flow_times[-1]))

    def _check_cond(self, cond: Any) -> None:
        if cond is not None and not (isinstance(cond, str) and cond == self.prompt):
            raise ValueError(f"cond {cond!r} differs from the prompt this denoiser encoded ({self.prompt!r}); "
                             "make one denoiser per prompt")

    def _model_timesteps(self, t: Tensor) -> Tensor:
        """diffusers' float32 timesteps sigma · T for flow times ``t`` (bit-identical to scheduler.timesteps)."""
        return t.to(torch.float32) * self._train_steps

    def _velocity(self, x_flow: Tensor, t: Tensor, cond: Any) -> Tensor:
        self._check_cond(cond)
        device, dtype = self.device, self.pipe.transformer.dtype
        x = x_flow.to(device, dtype)
        steps = self._model_timesteps(t).to(device)
        outs = [self._guided(x[s], steps[s]) for s in chunks(x.shape[0], self.batch_size)]
        return torch.cat(outs).to(x_flow.device, x_flow.dtype)

    def _guided(self, x: Tensor, timesteps: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class SD3Denoiser(_FlowPipelineDenoiser):
    """A ``StableDiffusion3Pipeline`` (SD3 / SD3.5, ``SD3Transformer2DModel``) for one prompt as a Denoiser.

    The prompt (and ``negative_prompt``) go through the pipeline's ``encode_prompt`` once (its CLIP
    pair and T5, ``max_sequence_length`` tokens); every call runs classifier-free guidance
    v = v_uncond + g (v_text − v_uncond) when ``guidance_scale`` > 1, micro-batched by ``batch_size``
    particles. ``sigmas`` / ``mu`` are passed to the scheduler as the pipeline passes them (``mu`` is
    computed from the image size when the scheduler uses dynamic shifting, as the pipeline does).
    Skip-layer guidance and IP-adapters are not supported.
    """

    def __init__(
        self,
        pipe: Any,
        prompt: str,
        negative_prompt: str | None = None,
        guidance_scale: float = 7.0,
        num_inference_steps: int = 28,
        height: int | None = None,
        width: int | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        max_sequence_length: int = 256,
        batch_size: int | None = None,
    ) -> None:
        _check_pipeline(pipe, SD3_PIPELINES, "SD3Denoiser")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        transformer = pipe.transformer
        scale, patch = pipe.vae_scale_factor, transformer.config.patch_size
        height = height or pipe.default_sample_size * scale
        width = width or pipe.default_sample_size * scale
        if height % (scale * patch) or width % (scale * patch):
            raise ValueError(f"height and width must be multiples of {scale * patch} (VAE scale x patch size), "
                             f"got {height}x{width}")
        shape = (transformer.config.in_channels, height // scale, width // scale)
        if mu is None and pipe.scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cfg = pipe.scheduler.config
            mu = calculate_shift((shape[1] // patch) * (shape[2] // patch), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        self.guidance_scale = float(guidance_scale)
        super().__init__(pipe, prompt, num_inference_steps, sigmas, mu, batch_size, shape)
        self._encode(negative_prompt, max_sequence_length)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def _encode(self, negative_prompt: str | None, max_sequence_length: int) -> None:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=self.prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_cfg, device=self.device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        if self.do_cfg:
            pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        self.text_embeds, self.pooled_embeds = pos, pooled

    def _guided(self, x: Tensor, timesteps: Tensor) -> Tensor:
        n, copies = x.shape[0], 2 if self.do_cfg else 1
        out = self.pipe.transformer(
            hidden_states=torch.cat([x] * copies), timestep=torch.cat([timesteps] * copies),
            encoder_hidden_states=self.text_embeds.repeat_interleave(n, dim=0),
            pooled_projections=self.pooled_embeds.repeat_interleave(n, dim=0), return_dict=False,
        )[0]
        if not self.do_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


class FluxDenoiser(_FlowPipelineDenoiser):
    """A ``FluxPipeline`` (FLUX.1 dev / schnell, ``FluxTransformer2DModel``) for one prompt as a Denoiser.

    The prompt goes through the pipeline's ``encode_prompt`` once (CLIP pooled + T5). Guidance-distilled
    models (``transformer.config.guidance_embeds``, FLUX.1-dev) get ``guidance_scale`` as their guidance
    embedding; with ``true_cfg_scale`` > 1 and a ``negative_prompt`` a second, negative call gives
    v = v_neg + s (v − v_neg), as the pipeline does. The engine's particles are unpacked latents
    [C, 2·⌊H/16⌋, 2·⌊W/16⌋]; each call packs them into 2×2 patches and unpacks the velocity. The
    timesteps are the pipeline's: sigmas linspace(1, 1/K, K) shifted by the resolution's ``mu``
    (unless given). IP-adapters are not supported.
    """

    def __init__(
        self,
        pipe: Any,
        prompt: str,
        negative_prompt: str | None = None,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        num_inference_steps: int = 28,
        height: int | None = None,
        width: int | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        max_sequence_length: int = 512,
        batch_size: int | None = None,
    ) -> None:
        _check_pipeline(pipe, FLUX_PIPELINES, "FluxDenoiser")
        if not guidance_scale >= 0 or not true_cfg_scale >= 0:
            raise ValueError(f"guidance_scale and true_cfg_scale must be >= 0, got {guidance_scale!r}, {true_cfg_scale!r}")
        transformer = pipe.transformer
        scale = pipe.vae_scale_factor
        height = height or pipe.default_sample_size * scale
        width = width or pipe.default_sample_size * scale
        if height % (2 * scale) or width % (2 * scale):
            raise ValueError(f"height and width must be multiples of {2 * scale} (VAE scale x 2x2 packing), "
                             f"got {height}x{width}")
        self.height, self.width = height, width
        shape = (transformer.config.in_channels // 4, 2 * (height // (2 * scale)), 2 * (width // (2 * scale)))
        cfg = pipe.scheduler.config
        if sigmas is None and not cfg.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if mu is None:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift((shape[1] // 2) * (shape[2] // 2), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.guidance_scale = float(guidance_scale)
        self.true_cfg_scale = float(true_cfg_scale)
        self.do_true_cfg = self.true_cfg_scale > 1 and negative_prompt is not None
        super().__init__(pipe, prompt, num_inference_steps, sigmas, mu, batch_size, shape)
        self._encode(negative_prompt, max_sequence_length)

    @torch.no_grad()
    def _encode(self, negative_prompt: str | None, max_sequence_length: int) -> None:
        device = self.device
        self.text_embeds, self.pooled_embeds, self.text_ids = self.pipe.encode_prompt(
            prompt=self.prompt, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length)
        self.negative = None
        if self.do_true_cfg:
            self.negative = self.pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=device,
                                                    num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        _, h, w = self.sample_shape
        self.image_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, self.text_embeds.dtype)

    def _model_timesteps(self, t: Tensor) -> Tensor:
        # the pipeline passes (scheduler.timesteps cast to the latents' dtype) / 1000 to the transformer
        dtype = self.text_embeds.dtype
        return super()._model_timesteps(t).to(dtype) / 1000

    def _guided(self, x: Tensor, timesteps: Tensor) -> Tensor:
        n, (c, h, w) = x.shape[0], self.sample_shape
        packed = self.pipe._pack_latents(x, n, c, h, w)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=x.device, dtype=torch.float32).expand(n)

        def call(embeds: Tensor, pooled: Tensor, text_ids: Tensor) -> Tensor:
            return self.pipe.transformer(
                hidden_states=packed, timestep=timesteps, guidance=guidance,
                pooled_projections=pooled.expand(n, -1), encoder_hidden_states=embeds.expand(n, -1, -1),
                txt_ids=text_ids, img_ids=self.image_ids, return_dict=False,
            )[0]

        v = call(self.text_embeds, self.pooled_embeds, self.text_ids)
        if self.negative is not None:
            v_neg = call(*self.negative)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return self.pipe._unpack_latents(v, self.height, self.width, self.pipe.vae_scale_factor)


def flow_denoiser_for(pipe: Any, prompt: str, **options: Any) -> SD3Denoiser | FluxDenoiser:
    """The flow-matching Denoiser for ``pipe`` (SD3 or FLUX text-to-image); any other pipeline is refused by name."""
    name = type(pipe).__name__
    if name in SD3_PIPELINES:
        return SD3Denoiser(pipe, prompt, **options)
    if name in FLUX_PIPELINES:
        return FluxDenoiser(pipe, prompt, **options)
    _check_pipeline(pipe, frozenset(), "the flow-matching adapters")
    raise AssertionError("unreachable")
