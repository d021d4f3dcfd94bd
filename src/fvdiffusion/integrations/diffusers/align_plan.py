"""``align()``'s second stage, *plan*: from an :class:`~.align_call.AlignCall` to everything the engine runs.

One planner per pipeline kind (:data:`PLANNERS`), in two parts:

- its *schedule*: the grid the scheduler's ``set_timesteps(K)`` chooses (:func:`.timesteps.scheduler_grid`,
  with the engine options that step as the scheduler does), truncated to the last ``int(K · strength)``
  steps for img2img; none for SD3 / FLUX, whose flow adapters take theirs from the scheduler's sigmas;
- its *populations*: per prompt the (denoiser, reward) adapters, the step grid and the initial x_T
  (the latents given, drawn from the generator as the pipeline draws them, or the noised init latent).

:func:`plan_call` runs them around what every kind shares: the scheduler's engine options merged
under the user's, the method's config validated, the ranks' agreement on the call, the engine seed
of each prompt. The random draws (x_T, then the seeds) come in the order the pipeline makes them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from fvdiffusion.config import SEED_MAX
from fvdiffusion.distributed import agree_call
from fvdiffusion.errors import SchedulerReplacedWarning, UnsupportedPipelineError
from fvdiffusion.integrations.diffusers._batching import module_device_dtype
from fvdiffusion.integrations.diffusers.align_call import DEFAULT_GUIDANCE, AlignCall
from fvdiffusion.integrations.diffusers.denoisers import (
    ControlNetDenoiser,
    StableDiffusionDenoiser,
    UNet2DModelDenoiser,
    schedule_from_scheduler,
)
from fvdiffusion.integrations.diffusers.flow import flow_denoiser_for
from fvdiffusion.integrations.diffusers.pipelines import pipeline_kind
from fvdiffusion.integrations.diffusers.rewards import LatentImageReward, PixelImageReward
from fvdiffusion.integrations.diffusers.timesteps import SchedulerGrid, scheduler_grid
from fvdiffusion.rewards.image_rewards import ImageReward
from fvdiffusion.samplers import get_method, make_config
from fvdiffusion.samplers.dts import DTSConfig
from fvdiffusion.schedule import StepGrid

# methods that call the reward only on the final samples, which they return as they are: align() keeps
# those images for the output (bon calls it only there too, but returns the samples reordered)
FINAL_REWARD_ONLY = ("base",)

Adapters = list[tuple[Any, LatentImageReward | PixelImageReward]]  # (denoiser, x̂0 reward) per prompt
Populations = tuple[Adapters, list[StepGrid], list[Tensor | None]]  # adapters, grids and x_T per prompt


@dataclass(frozen=True)
class AlignPlan:
    """What the engine runs for each prompt of an :class:`~.align_call.AlignCall`: index i is prompt i."""

    steps: SchedulerGrid | None       # the scheduler's grid and engine options; None for flow pipelines
    num_steps: int                    # the engine's K (img2img: the steps left after strength)
    method_options: dict[str, Any]    # the engine options: the scheduler's, overridden by the user's
    config: Any                       # the method's config built from them (validated before any model runs)
    adapters: Adapters                # (denoiser, x̂0 reward) per prompt
    grids: list[StepGrid]             # the step grid per prompt
    x_inits: list[Tensor | None]      # x_T per prompt in the engine's terms; None: drawn by the engine from its seed
    seeds: list[int]                  # the engine seed per prompt


class Schedule(NamedTuple):
    """A kind's step grid: what its scheduler chose, the grid the engine runs, and K."""

    steps: SchedulerGrid | None       # None: the flow adapters take the grid from the scheduler's sigmas
    grid: StepGrid | None             # the grid every population runs (img2img: truncated at strength)
    num_steps: int


class Planner(NamedTuple):
    """How one pipeline kind is planned: its schedule, then per prompt (adapters, grids, x_inits)."""

    schedule: Callable[[Any, AlignCall], Schedule]
    populations: Callable[[Any, AlignCall, Schedule], Populations]


def plan_call(pipe: Any, call: AlignCall) -> AlignPlan:
    """The plan for ``call`` on ``pipe``: schedule, engine config, agreement, adapters, x_T and seeds, in that order."""
    planner = PLANNERS[call.kind]
    # the scheduler names a bad step count in its own terms, before the engine's config does
    schedule = planner.schedule(pipe, call)
    steps, options = schedule.steps, call.method_options
    if steps is not None:  # the scheduler's transition (and x̂0 processing) unless the user chose their own
        options = {**dict(steps.engine_options), **options}
    # validate every engine option before any model runs (and read eta for the scheduler warning)
    config = make_config(call.method, n_particles=call.n, num_steps=schedule.num_steps, seed=call.engine_seed,
                         batch_size=call.batch_size, **options)
    if call.sharded is not False:  # every rank must make the same call before one population spans them
        agree_call({"pipeline": call.pipe_name, "prompt": call.prompts, "negative_prompt": call.negatives,
                    "num_images_per_prompt": call.n, "num_inference_steps": call.num_inference_steps,
                    "method": call.method, "method options": options, "guidance_scale": call.guidance,
                    "height": call.height, "width": call.width, "seed": call.engine_seed,
                    "generator state": None if call.generator is None else call.generator.get_state(),
                    "latents": call.latents, "image": _as_tensor(call.image), "strength": call.strength,
                    "controlnet_conditioning_scale": call.controlnet_conditioning_scale,
                    "max_sequence_length": call.max_sequence_length}, "align()", _pipeline_device(pipe))
    if call.max_sequence_length is not None and call.kind != "flow":  # checked here, after the agreement, as ever
        raise ValueError(f"{call.pipe_name} has no T5 encoder: max_sequence_length applies to SD3 / FLUX "
                         "pipelines only")
    if steps is not None and steps.replaced:  # stacklevel 3: the warning names align()'s caller
        warnings.warn(steps.warning(config.eta), SchedulerReplacedWarning, stacklevel=3)
    adapters, grids, x_inits = planner.populations(pipe, call, schedule)
    if call.generator is not None:  # drawn after x_T, as the pipeline's own draws come first
        seeds = torch.randint(0, SEED_MAX, (len(call.prompts),), generator=call.generator,
                              device=call.generator.device).tolist()
    else:
        seeds = [call.engine_seed + i for i in range(len(call.prompts))]
    if call.method in FINAL_REWARD_ONLY and call.output_type != "latent":
        for _, image_reward in adapters:  # their only reward call is on the final samples: decode those once
            if isinstance(image_reward, LatentImageReward):
                image_reward.keep_last = True
    return AlignPlan(steps=steps, num_steps=schedule.num_steps, method_options=options, config=config,
                     adapters=adapters, grids=grids, x_inits=x_inits, seeds=seeds)


# --- schedules ---------------------------------------------------------------------------------------

def _scheduler_schedule(pipe: Any, call: AlignCall) -> Schedule:
    """The grid ``pipe.scheduler.set_timesteps(K)`` chooses, K = num_inference_steps."""
    steps = scheduler_grid(pipe.scheduler, call.num_inference_steps, schedule_from_scheduler(pipe.scheduler))
    return Schedule(steps, steps.grid, call.num_inference_steps)


def _img2img_schedule(pipe: Any, call: AlignCall) -> Schedule:
    """The scheduler's K-step grid truncated to its last ``int(K · strength)`` steps."""
    steps = scheduler_grid(pipe.scheduler, call.num_inference_steps, schedule_from_scheduler(pipe.scheduler))
    grid = _truncated_grid(schedule_from_scheduler(pipe.scheduler), steps.grid, call.strength)
    return Schedule(steps, grid, len(grid))


def _flow_schedule(pipe: Any, call: AlignCall) -> Schedule:
    """None here: the flow adapters take the grid from the pipeline's FlowMatchEuler scheduler (and warn if it is
    another)."""
    return Schedule(None, None, call.num_inference_steps)


# --- populations: per prompt (denoiser, reward), grid and x_T ------------------------------------------

def _prompted_populations(pipe: Any, call: AlignCall, schedule: Schedule) -> Populations:
    """Text-to-image (SD / SDXL) and unconditional pixel pipelines."""
    adapters = _adapters(pipe, call, call.height, call.width, None)
    return adapters, [schedule.grid] * len(call.prompts), _in_vp_terms(_start_latents(pipe, call, adapters), schedule)


def _controlnet_populations(pipe: Any, call: AlignCall, schedule: Schedule) -> Populations:
    """SD ControlNet: the control image (resized to height / width if given) decides the size."""
    control = _preprocess_control(pipe, call.image, call.height, call.width)
    adapters = _adapters(pipe, call, int(control.shape[-2]), int(control.shape[-1]), control)
    return adapters, [schedule.grid] * len(call.prompts), _in_vp_terms(_start_latents(pipe, call, adapters), schedule)


def _img2img_populations(pipe: Any, call: AlignCall, schedule: Schedule) -> Populations:
    """SD img2img: the init image decides the size; it is encoded (and noised) after the prompts."""
    init_image = _preprocess(pipe, call.image)
    adapters = _adapters(pipe, call, int(init_image.shape[-2]), int(init_image.shape[-1]), None)
    draws = call.generator if call.generator is not None else torch.Generator().manual_seed(call.engine_seed)
    noised = _noised_init_latents(pipe, init_image, schedule.grid[0].alpha_bar, len(call.prompts) * call.n, draws)
    return adapters, [schedule.grid] * len(call.prompts), list(noised.split(call.n))


def _flow_populations(pipe: Any, call: AlignCall, schedule: Schedule) -> Populations:
    """SD3 / FLUX: each prompt's flow adapter has its own grid; the engine's state is x_t / c(t)."""
    tokens = {} if call.max_sequence_length is None else {"max_sequence_length": call.max_sequence_length}
    adapters = [(flow_denoiser_for(pipe, p, negative_prompt=neg, guidance_scale=call.guidance,
                                   num_inference_steps=call.num_inference_steps, height=call.height,
                                   width=call.width, batch_size=call.batch_size, **tokens),
                 LatentImageReward(pipe, call.reward, call.batch_size))
                for p, neg in zip(call.prompts, call.negatives)]
    grids = [denoiser.grid for denoiser, _ in adapters]
    # the pipeline's latents are x_t at the first sigma
    x_inits = [None if x is None else denoiser.initial_state(x)
               for x, (denoiser, _) in zip(_start_latents(pipe, call, adapters, flow=True), adapters)]
    return adapters, grids, x_inits


PLANNERS: dict[str, Planner] = {
    "t2i": Planner(_scheduler_schedule, _prompted_populations),
    "pixel": Planner(_scheduler_schedule, _prompted_populations),
    "controlnet": Planner(_scheduler_schedule, _controlnet_populations),
    "img2img": Planner(_img2img_schedule, _img2img_populations),
    "flow": Planner(_flow_schedule, _flow_populations),
}


def _adapters(pipe: Any, call: AlignCall, height: int | None, width: int | None, control: Tensor | None) -> Adapters:
    scale = 1.0 if call.controlnet_conditioning_scale is None else call.controlnet_conditioning_scale
    return [build_adapters(pipe, p, call.reward, call.guidance, neg, call.batch_size, height, width, control, scale)
            for p, neg in zip(call.prompts, call.negatives)]


def _start_latents(pipe: Any, call: AlignCall, adapters: Adapters, flow: bool = False) -> list[Tensor | None]:
    """x_T per prompt as the pipeline starts: the latents given, else one batch for every prompt drawn from the
    generator as the pipeline draws it, else None (the engine draws each prompt's x_T from its seed)."""
    denoiser0 = adapters[0][0]
    sample_shape = tuple(denoiser0.sample_shape)
    takes_x_init = not issubclass(get_method(call.method).config_class, DTSConfig)  # a search tree has one root
    latents = call.latents
    if latents is not None:
        if flow and isinstance(latents, Tensor) and latents.ndim == 3 and len(sample_shape) == 3:
            latents = _unpack_flux_latents(pipe, latents, sample_shape)  # FLUX's own packed layout
        return _split_latents(latents, len(call.prompts), call.n, sample_shape)
    if call.generator is not None and takes_x_init:
        dtype = pipe.transformer.dtype if flow else _latent_dtype(pipe)
        drawn = _draw_latents(call.generator, (len(call.prompts) * call.n, *sample_shape), denoiser0.device, dtype)
        return list(drawn.split(call.n))
    return [None] * len(call.prompts)


def _in_vp_terms(x_inits: list[Tensor | None], schedule: Schedule) -> list[Tensor | None]:
    """A sigma-space scheduler's x_T (unit variance) in the engine's VP terms: times its latent_scale."""
    if schedule.steps.latent_scale == 1.0:
        return x_inits
    return [None if x is None else x * schedule.steps.latent_scale for x in x_inits]


# --- adapters ----------------------------------------------------------------------------------------

def build_adapters(
    pipe: Any,
    prompt: str | None,
    reward: ImageReward,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str | None = None,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    control_image: Tensor | None = None,
    controlnet_conditioning_scale: float = 1.0,
) -> tuple[Any, LatentImageReward | PixelImageReward]:
    """The Denoiser and the x̂0 reward for ``pipe``; raises a clear error for unsupported pipelines.

    A ControlNet pipeline takes ``control_image``, preprocessed ([1, 3, H, W], see :func:`_preprocess_control`)."""
    name = type(pipe).__name__
    kind = pipeline_kind(pipe)
    if kind == "flow":
        raise UnsupportedPipelineError(f"{name} is a flow-matching pipeline: its denoiser needs the step count, "
                                       "use align() or flow_denoiser_for(pipe, prompt, num_inference_steps=...)")
    if kind in ("t2i", "img2img", "controlnet"):
        if not isinstance(prompt, str):
            raise ValueError(f"{name} is a text-to-image pipeline: pass the prompt as a string, got {prompt!r}")
        if kind == "controlnet":
            if control_image is None:
                raise ValueError(f"{name} needs its control image: pass control_image=... (preprocessed)")
            denoiser = ControlNetDenoiser(pipe, prompt, control_image, controlnet_conditioning_scale, negative_prompt,
                                          guidance_scale, batch_size)
            return denoiser, LatentImageReward(pipe, reward, batch_size)
        denoiser = StableDiffusionDenoiser(pipe, prompt, negative_prompt, guidance_scale, batch_size, height, width)
        return denoiser, LatentImageReward(pipe, reward, batch_size)
    if prompt is not None:
        raise ValueError(f"{name} is unconditional: pass prompt=None")
    denoiser = UNet2DModelDenoiser(pipe.unet, pipe.scheduler)
    size = tuple(denoiser.sample_shape[1:])
    for arg, value, have in (("height", height, size[0]), ("width", width, size[1])):
        if value is not None and value != have:
            raise ValueError(f"{name} samples {size[0]}x{size[1]} pixels (its UNet's sample_size): {arg}={value} is not supported")
    return denoiser, PixelImageReward(reward, batch_size)


# --- images and latents ------------------------------------------------------------------------------

def _as_tensor(image: Any) -> Any:
    """An init / control image as a tensor where it can be one (PIL, numpy), to compare its pixels."""
    if image is None or isinstance(image, Tensor):
        return image
    try:
        import numpy as np

        return torch.from_numpy(np.array(image))
    except Exception:
        return repr(image)


def _pipeline_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _latent_dtype(pipe: Any) -> torch.dtype:
    """The dtype diffusers draws the initial latents in: the text encoder's for SD pipelines, else the UNet's."""
    encoder = getattr(pipe, "text_encoder", None)
    module = encoder if isinstance(encoder, torch.nn.Module) else pipe.unet
    return module_device_dtype(module)[1]


def _draw_latents(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """torch.randn exactly as diffusers' ``randn_tensor`` draws a batch from one generator."""
    device = torch.device(device)
    if generator.device.type == "cpu":
        draw_on = torch.device("cpu")
    elif generator.device.type == device.type:
        draw_on = device
    else:
        raise ValueError(f"generator is on {generator.device} but the pipeline runs on {device}: "
                         f"create it with torch.Generator({device.type!r}) or on the CPU")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def _split_latents(latents: Any, n_prompts: int, n: int, sample_shape: tuple[int, ...]) -> list[Tensor]:
    shape = (n_prompts * n, *sample_shape)
    if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor of shape {shape} (prompts x num_images_per_prompt, *sample shape), "
                         f"got {got}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN or inf")
    return list(latents.split(n))


def _unpack_flux_latents(pipe: Any, latents: Tensor, sample_shape: tuple[int, ...]) -> Tensor:
    """FLUX takes latents packed as [B, (h/2)(w/2), 4C]; the engine's particles are [B, C, h, w]."""
    channels, h, w = sample_shape
    if latents.shape[1:] != ((h // 2) * (w // 2), 4 * channels):
        raise ValueError(f"latents: expected FLUX's packed shape [B, {(h // 2) * (w // 2)}, {4 * channels}] or "
                         f"[B, {channels}, {h}, {w}], got {list(latents.shape)}")
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(latents, h * scale, w * scale, scale)


def _preprocess_control(pipe: Any, image: Any, height: int | None, width: int | None) -> Tensor:
    """The control image as the pipeline's ``prepare_image`` preprocesses it: [1, 3, H, W] in [0, 1], float32."""
    processed = pipe.control_image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    if processed.shape[0] != 1:
        raise ValueError(f"{type(pipe).__name__}: pass one control image, got a batch of {processed.shape[0]}")
    return processed


def _truncated_grid(schedule: Any, grid: StepGrid, strength: float) -> StepGrid:
    """The last ``int(K · strength)`` steps of the K-step grid, as diffusers' img2img ``get_timesteps``."""
    k = len(grid)
    keep = min(int(k * strength), k)
    if keep < 1:
        raise ValueError(f"strength={strength:g} with num_inference_steps={k} leaves no step to run "
                         f"(int({k} * strength) = 0): raise strength or num_inference_steps")
    kept = grid.steps[k - keep:]
    return StepGrid.from_landings(schedule, [s.t for s in kept], [s.t_prev for s in kept])


def _preprocess(pipe: Any, image: Any) -> Tensor:
    """The init image as the pipeline preprocesses it: [1, 3, H, W] in [−1, 1], H and W multiples of the VAE factor."""
    processed = pipe.image_processor.preprocess(image)
    if processed.shape[0] != 1:
        raise ValueError(f"{type(pipe).__name__}: pass one init image, got a batch of {processed.shape[0]}")
    return processed


@torch.no_grad()
def _noised_init_latents(pipe: Any, image: Tensor, alpha_bar: float, count: int, generator: torch.Generator) -> Tensor:
    """x_t = √ᾱ z0 + √(1 − ᾱ) ε for ``count`` particles, z0 the VAE latent of the image, drawn as diffusers draws
    them: one latent sample from the encoder's distribution, then one noise batch, both from ``generator``."""
    dtype = _latent_dtype(pipe)
    device = pipe._execution_device
    encoded = pipe.vae.encode(image.to(device=device, dtype=dtype)).latent_dist.sample(generator)
    z0 = (pipe.vae.config.scaling_factor * encoded).expand(count, *encoded.shape[1:])
    noise = _draw_latents(generator, tuple(z0.shape), device, dtype)
    ab = torch.tensor(alpha_bar, dtype=torch.float64)
    x = ab.sqrt().float() * z0.float() + (1 - ab).sqrt().float() * noise.float()
    return x.to(dtype).float()
