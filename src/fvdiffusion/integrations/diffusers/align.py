"""``align()``: reward-align the samples of a diffusers pipeline in one call, with diffusers' arguments.

    out = fvdiffusion.align(pipe, "a red bicycle", reward, method="fvd", num_images_per_prompt=8,
                            generator=torch.Generator().manual_seed(0))
    out.images[0]  # the highest-reward image

The pipeline is used as it is (no forked pipeline): its UNet and text encoders become a
Denoiser, its VAE decodes x̂0 latents for the image reward, its scheduler's
``set_timesteps(K)`` decides the step grid (:mod:`.timesteps`), and the engine does the
stepping with DDIM(η). Supported, by exact class name (:mod:`.pipelines`):
``StableDiffusionPipeline`` (1.x / 2.x), ``StableDiffusionXLPipeline`` (base), ``StableDiffusionImg2ImgPipeline``
(from the noised init latent at ``strength``), ``StableDiffusionControlNetPipeline`` (one ControlNetModel, its
control image passed to the ControlNet at every UNet call), ``DDPMPipeline`` /
``DDIMPipeline`` (``UNet2DModel``, no prompt), ``StableDiffusion3Pipeline`` and ``FluxPipeline``
(:mod:`.flow`). Every other class (other img2img, inpaint, other ControlNet / adapter, DiT, PixArt, Kandinsky, …) is
refused before any model runs with one :class:`UnsupportedPipelineError` line saying why.
"""

from __future__ import annotations

import math

import inspect
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.api import sample
from fvdiffusion.config import SEED_MAX
from fvdiffusion.distributed import agree_call
from fvdiffusion.errors import (
    CallbackChangesIgnoredWarning,
    DuplicateImagesWarning,
    SchedulerReplacedWarning,
    UnsupportedPipelineError,
)
from fvdiffusion.integrations.diffusers._batching import module_device_dtype
from fvdiffusion.integrations.diffusers.denoisers import (
    ControlNetDenoiser,
    StableDiffusionDenoiser,
    UNet2DModelDenoiser,
    schedule_from_scheduler,
)
from fvdiffusion.integrations.diffusers.flow import flow_denoiser_for
from fvdiffusion.integrations.diffusers.pipelines import pipeline_kind
from fvdiffusion.integrations.diffusers.rewards import LatentImageReward, PixelImageReward
from fvdiffusion.integrations.diffusers.timesteps import scheduler_grid
from fvdiffusion.loop import StepEvent
from fvdiffusion.result import SampleResult
from fvdiffusion.rewards.image_rewards import ImageReward
from fvdiffusion.rewards.model_rewards import require
from fvdiffusion.samplers import get_method, make_config
from fvdiffusion.samplers.dts import DTSConfig
from fvdiffusion.schedule import StepGrid

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_PARTICLES = 8
DEFAULT_GUIDANCE = 7.5
# methods that call the reward only on the final samples, which they return as they are: align() keeps
# those images for the output (bon calls it only there too, but returns the samples reordered)
FINAL_REWARD_ONLY = ("base",)


@dataclass
class AlignResult:
    """The images of one prompt ranked by final reward (best first), like a diffusers pipeline output.

    ``images``: with ``output_type`` "pil" a list of PIL images; "np" a float32 array
    [N, H, W, 3] in [0, 1]; "pt" a float tensor [N, 3, H, W] in [0, 1]; "latent" the final
    samples [N, C, h, w] (latents, or pixels in [−1, 1] for a pixel pipeline), not decoded.
    ``rewards[i]`` is the reward of ``images[i]``; ``ranking[i]`` its index in
    ``result.samples`` (and in the lineage). ``nsfw_content_detected[i]`` is the pipeline's
    safety checker's verdict on ``images[i]`` (flagged images are replaced as the checker
    replaces them: black), None when the pipeline has no checker or nothing was decoded.
    ``duplicates`` counts images that are copies of another one (selection cloned a particle
    and nothing made the copies differ); ``distinct_images = N − duplicates``.
    """

    images: Any
    rewards: Tensor        # [N] final rewards in the order of ``images``
    ranking: Tensor        # [N] long
    result: SampleResult | list[SampleResult]  # a list for a flat result of several prompts
    nsfw_content_detected: list[bool] | None = None
    duplicates: int = 0
    prompt: str | list[str] | None = None

    @property
    def distinct_images(self) -> int:
        return int(self.ranking.numel()) - self.duplicates

    # diffusers' BaseOutput: out[0] / out["images"], to_tuple(), as a pipeline's output is read
    def to_tuple(self) -> tuple[Any, ...]:
        """``(images, nsfw_content_detected)`` as ``pipe(..., return_dict=False)`` gives, the None dropped."""
        return tuple(v for v in (self.images, self.nsfw_content_detected) if v is not None)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"AlignResult has no field {key!r}; fields: {', '.join(self.keys())}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    @classmethod
    def flat(cls, results: list["AlignResult"]) -> "AlignResult":
        """One result for a prompt list, shaped as ``pipe(list)`` returns it: prompt i's images (best first)
        at rows i·N … i·N + N − 1; ``prompt`` and ``ranking`` per image, ``result`` the list of engine results."""
        first = results[0].images
        if isinstance(first, Tensor):
            images: Any = torch.cat([r.images for r in results])
        elif isinstance(first, list):
            images = [image for r in results for image in r.images]
        else:
            import numpy as np

            images = np.concatenate([r.images for r in results])
        nsfw = None if results[0].nsfw_content_detected is None else \
            [flag for r in results for flag in r.nsfw_content_detected]
        return cls(images=images, rewards=torch.cat([r.rewards for r in results]),
                   ranking=torch.cat([r.ranking for r in results]), result=[r.result for r in results],
                   nsfw_content_detected=nsfw, duplicates=sum(r.duplicates for r in results),
                   prompt=[r.prompt for r in results for _ in range(r.ranking.numel())])


def _pipeline_kind(pipe: Any) -> str:
    """"t2i" (SD / SDXL), "img2img" (SD img2img), "pixel" (DDPM / DDIM on a UNet2DModel) or "flow" (SD3 / FLUX), by
    class name (:mod:`.pipelines`); any other class is refused before anything runs."""
    return pipeline_kind(pipe)


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
    kind = _pipeline_kind(pipe)
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


def to_pil(images: Tensor) -> list[Any]:
    """Float images [B, 3, H, W] (or single-channel [B, 1, H, W], shown grey) in [0, 1] -> PIL RGB images."""
    image_module = require("PIL.Image", "plot")
    if images.dim() == 4 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return [image_module.fromarray(p) for p in _to_uint8(images)]


def _to_uint8(images: Tensor) -> Any:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def rank_by_reward(rewards: Tensor) -> Tensor:
    """Indices sorting rewards best first; NaN / −inf rewards go last."""
    clean = torch.where(torch.isnan(rewards), torch.full_like(rewards, -float("inf")), rewards)
    return torch.sort(clean, descending=True, stable=True).indices


# --- arguments ---------------------------------------------------------------------------------

def _prompts(prompt: Any) -> tuple[list[str | None], bool]:
    """(the prompts, whether one was given rather than a list)."""
    if prompt is None or isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list: pass at least one prompt")
        bad = [p for p in prompt if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompt lists must hold strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return list(prompt), False
    raise TypeError(f"prompt must be a string, a list of strings or None, got {type(prompt).__name__}")


def _negative_prompts(negative_prompt: Any, prompts: list[str | None], single: bool) -> list[str | None]:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt] * len(prompts)
    if isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        if single or len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompt(s): "
                             "pass one string, or a list as long as the prompt list")
        return list(negative_prompt)
    raise TypeError(f"negative_prompt must be a string, a list of strings or None, got {type(negative_prompt).__name__}")


def _particles(num_images_per_prompt: Any, n_particles: Any) -> int:
    if num_images_per_prompt is not None and n_particles is not None and num_images_per_prompt != n_particles:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} and n_particles={n_particles!r} name the same "
                         "thing (particles per prompt): pass one")
    n = num_images_per_prompt if num_images_per_prompt is not None else n_particles
    n = DEFAULT_PARTICLES if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt (particles per prompt) must be a positive integer, got {n!r}")
    return n


def _check_generator(generator: Any, seed: Any) -> None:
    if generator is None:
        return
    if isinstance(generator, (list, tuple)):
        raise ValueError("generator: pass one torch.Generator (a list of generators, one per image, is not supported)")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None:
        raise ValueError("pass either generator or seed, not both (the engine's seed is drawn from the generator)")


def _refuse_pipeline_arguments(pipe: Any, method: str, options: dict[str, Any]) -> None:
    """A diffusers argument align() does not implement is named as such (not as an unknown method option)."""
    fields = get_method(method).config_class.field_names()
    if "num_steps" in options:
        raise ValueError("align() takes the step count as num_inference_steps, not num_steps")
    try:
        pipe_args = set(inspect.signature(type(pipe).__call__).parameters)
    except (AttributeError, TypeError, ValueError):
        pipe_args = set()
    for key in options:
        if key not in fields and key in pipe_args:
            raise ValueError(
                f"align() does not support {type(pipe).__name__}'s argument {key!r}; the diffusers arguments it takes "
                "are num_inference_steps, guidance_scale, negative_prompt, height, width, generator, latents, "
                "num_images_per_prompt, output_type and callback_on_step_end"
            )


def _default_guidance(pipe: Any) -> float:
    """The pipeline's own default guidance_scale (7.5 for SD, 5.0 for SDXL), else 7.5."""
    try:
        default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return DEFAULT_GUIDANCE
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else DEFAULT_GUIDANCE


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


@dataclass
class _CallbackWatch:
    """Whether a callback_on_step_end has tried to change the population yet (one warning per call)."""

    warned: bool = False

    def check(self, returned: Any, passed: dict[str, Any], population: Tensor) -> None:
        if self.warned:
            return
        changed = [key for key, value in (returned.items() if isinstance(returned, dict) else ())
                   if key in passed and value is not passed[key]]
        if not torch.equal(passed["latents"], population):
            changed.append("latents (in place)")
        if changed:
            self.warned = True
            warnings.warn(f"align(): callback_on_step_end changed {', '.join(changed)}; the changes are not applied "
                          "(the engine selects the population itself, so the callback observes only)",
                          CallbackChangesIgnoredWarning, stacklevel=4)


def _refuse_pipeline_callback(on_step_end: Any) -> None:
    """diffusers' PipelineCallback objects change the pipeline's own state mid-run (e.g. the CFG cutoff
    drops the negative half of prompt_embeds): align() runs its own denoiser and cannot honour them."""
    bases = {cls.__name__ for cls in type(on_step_end).__mro__}
    if bases & {"PipelineCallback", "MultiPipelineCallbacks"}:
        raise ValueError(f"callback_on_step_end={type(on_step_end).__name__} is a diffusers PipelineCallback, which "
                         "align() does not support (it changes the pipeline's guidance or embeddings mid-run, which "
                         "align()'s own denoiser would not see); pass a plain fn(pipe, step, timestep, kwargs) that "
                         "observes")


def _check_size_and_guidance(height: Any, width: Any, guidance_scale: Any) -> None:
    """One line for a size or guidance that the pipeline would misread (0 taken as "default") or
    fail on deep inside torch (a negative size), or that would turn every latent into NaN (inf)."""
    for arg, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{arg} must be a positive number of pixels, got {value!r}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")


def _step_callback(pipe: Any, callback: Callable[[StepEvent], Any] | None, on_step_end: Callable[..., Any] | None,
                   prompt_index: int, prompt: str | None, watch: _CallbackWatch) -> Callable[[StepEvent], Any] | None:
    if callback is None and on_step_end is None:
        return None

    def observe(event: StepEvent) -> None:
        if callback is not None:
            callback(event)
        if on_step_end is not None:
            kwargs = {"latents": event.state.x.detach().clone(), "trace": event.trace,
                      "prompt": prompt, "prompt_index": prompt_index}
            passed = dict(kwargs)
            returned = on_step_end(pipe, event.info.index, event.info.t, kwargs)  # observes only
            watch.check(returned, passed, event.state.x)

    return observe


def _safety_check(pipe: Any, images: Tensor) -> tuple[Tensor, list[bool] | None]:
    """Run the pipeline's safety checker on images [N, 3, H, W] in [0, 1]: (checked images, flags)."""
    checker = getattr(pipe, "safety_checker", None)
    if checker is None:
        return images, None
    extractor = getattr(pipe, "feature_extractor", None)
    if extractor is None:
        raise ValueError(f"{type(pipe).__name__} has a safety_checker but no feature_extractor to prepare its input")
    device, dtype = module_device_dtype(checker) if isinstance(checker, torch.nn.Module) else (images.device, images.dtype)
    clip_input = extractor(to_pil(images), return_tensors="pt").pixel_values.to(device, dtype)
    checked, flags = checker(images=images.clone(), clip_input=clip_input)
    flags = [bool(f) for f in flags]
    if isinstance(checked, Tensor) and checked.shape == images.shape:
        return checked.to(images.device, images.dtype), flags
    # a checker that returns something else: blank flagged images the way diffusers' checker does
    mask = torch.tensor(flags, device=images.device).view(-1, 1, 1, 1)
    return torch.where(mask, torch.zeros_like(images), images), flags


def _format(images: Tensor, output_type: str) -> Any:
    if output_type == "pil":
        return to_pil(images)
    if output_type == "np":
        return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    return images


# --- align -------------------------------------------------------------------------------------

def align(
    pipe: Any,
    prompt: str | list[str] | None,
    reward: ImageReward,
    *,
    method: str = "fvd",
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    latents: Tensor | None = None,
    num_images_per_prompt: int | None = None,
    n_particles: int | None = None,
    output_type: str = "pil",
    callback_on_step_end: Callable[..., Any] | None = None,
    callback: Callable[[StepEvent], Any] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    max_sequence_length: int | None = None,
    image: Any = None,
    strength: float | None = None,
    controlnet_conditioning_scale: float | None = None,
    control_guidance_start: float | None = None,
    control_guidance_end: float | None = None,
    guess_mode: bool | None = None,
    sharded: bool | None = None,
    flatten: bool = False,
    **method_options: Any,
) -> AlignResult | list[AlignResult]:
    """Sample ``num_images_per_prompt`` images per prompt from ``pipe`` with ``method`` steering towards ``reward``.

    The arguments are the pipeline's own where they exist:

    - ``prompt``: a string (one :class:`AlignResult`), a list (one population per prompt, a list of
      results in the same order; ``flatten=True``: one result with every prompt's images in order, as
      ``pipe(list)`` returns them) or None for an unconditional pipeline;
    - ``num_images_per_prompt`` (alias ``n_particles``, default 8): the particles per prompt;
    - ``num_inference_steps``: K; the grid is the one ``pipe.scheduler.set_timesteps(K)`` chooses;
    - ``guidance_scale`` (default: the pipeline's own), ``negative_prompt``, ``height``, ``width``;
    - ``generator``: the initial latents are drawn from it as the pipeline draws them (one
      ``torch.randn`` of shape [prompts × N, C, h, w] in the pipeline's dtype), then the engine's
      seed for each prompt (``torch.randint(0, 2**63 − 1, (prompts,), generator=generator)``), which
      drives everything else (step noise, selection). ``seed`` instead: the engine draws the initial
      noise itself, prompt i with seed ``seed + i`` (default 0);
    - ``latents`` [prompts × N, C, h, w]: the initial noise (unit variance, as diffusers takes it);
    - ``output_type``: "pil", "np", "pt" or "latent" (see :class:`AlignResult`);
    - ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`` after every step, with
      ``callback_kwargs = {"latents", "trace" (the step's StepTrace), "prompt", "prompt_index"}``. It
      observes only: changed latents it returns (or writes in place) are not applied, with one
      :class:`~fvdiffusion.errors.CallbackChangesIgnoredWarning`; diffusers' ``PipelineCallback`` objects
      (the CFG cutoffs) are refused.
      ``callback`` receives the engine's :class:`~fvdiffusion.loop.StepEvent` instead;
    - ``max_sequence_length``: the T5 prompt length of SD3 / FLUX pipelines (their default if None);
    - ``image``, ``strength`` (default 0.8): ``StableDiffusionImg2ImgPipeline`` only. One init image
      (PIL, array or tensor, as the pipeline takes it) for every prompt; its size decides the output
      size. As in the pipeline: the image is preprocessed and VAE-encoded (a latent sample drawn from
      ``generator``), then noised to the first timestep of the truncated grid (the last
      ``int(K · strength)`` of the K timesteps ``set_timesteps(K)`` chose) with noise drawn from
      ``generator``; the engine runs those remaining steps. Without a generator both draws come from
      ``torch.Generator().manual_seed(seed)``.
    - ``image`` (the control image), ``controlnet_conditioning_scale`` (default 1.0):
      ``StableDiffusionControlNetPipeline`` with one ``ControlNetModel`` only. One control image for every
      prompt, preprocessed as the pipeline does (``control_image_processor``, resized to ``height`` / ``width``
      when given, else its own size decides the output size); the ControlNet runs on every UNet call with the
      image repeated for every row (both CFG halves) and its residuals scaled by the conditioning scale.
      ``control_guidance_start`` must be 0 and ``control_guidance_end`` 1, ``guess_mode`` False (the defaults).

    SD3 and FLUX pipelines run through the flow-matching adapters
    (:mod:`fvdiffusion.integrations.diffusers.flow`): their scheduler's sigmas decide the grid and
    the engine steps the VP view of the rectified flow (η = 0 is the pipeline's Euler ODE).

    ``reward(images, prompt)`` takes float images [B, 3, H, W] in [0, 1] and returns [B].
    ``batch_size`` micro-batches the UNet, the VAE and the reward (results do not depend on it).
    ``method_options`` go to :func:`fvdiffusion.sample` (e.g. ``lam``, ``eta`` (default 1),
    ``rebirth_noise``). A scheduler other than DDIM/DDPM has its timesteps used but its stepping
    replaced by the engine's DDIM(η): one :class:`~fvdiffusion.errors.SchedulerReplacedWarning`
    says so. Images that are copies of another raise one
    :class:`~fvdiffusion.errors.DuplicateImagesWarning`.

    In an initialised process group (torchrun; NCCL with each rank's pipeline on its own GPU)
    each prompt's population is spread over the ranks as in :func:`fvdiffusion.sample`: every
    rank gets the whole result, and the step callbacks see this rank's block of the latents.
    ``sharded=False`` runs every population whole in each process (docs/distributed.md).
    """
    prompts, single = _prompts(prompt)
    negatives = _negative_prompts(negative_prompt, prompts, single)
    n = _particles(num_images_per_prompt, n_particles)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
    for arg, fn in (("callback_on_step_end", callback_on_step_end), ("callback", callback)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    if callback_on_step_end is not None:
        _refuse_pipeline_callback(callback_on_step_end)
    _check_size_and_guidance(height, width, guidance_scale)
    _check_generator(generator, seed)
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten must be True or False, got {flatten!r}")
    name = type(pipe).__name__
    kind = _pipeline_kind(pipe)
    _refuse_pipeline_arguments(pipe, method, method_options)
    if kind == "pixel":
        for arg, value in (("guidance_scale", guidance_scale), ("negative_prompt", negative_prompt)):
            if value is not None:
                raise ValueError(f"{name} is unconditional: {arg} does not apply")
        if not single or prompts[0] is not None:
            raise ValueError(f"{name} is unconditional: pass prompt=None")
    elif prompts[0] is None:
        raise ValueError(f"{name} is a text-to-image pipeline: pass the prompt as a string, got None")
    if kind != "controlnet":
        for arg, value in (("controlnet_conditioning_scale", controlnet_conditioning_scale),
                           ("control_guidance_start", control_guidance_start),
                           ("control_guidance_end", control_guidance_end), ("guess_mode", guess_mode)):
            if value is not None:
                raise ValueError(f"{name} has no ControlNet: {arg} applies to StableDiffusionControlNetPipeline")
    else:
        controlnet_conditioning_scale = _check_controlnet(pipe, image, strength, controlnet_conditioning_scale,
                                                          control_guidance_start, control_guidance_end, guess_mode)
    if kind not in ("img2img", "controlnet"):
        for arg, value in (("image", image), ("strength", strength)):
            if value is not None:
                raise ValueError(f"{name} takes no init image: {arg} applies to StableDiffusionImg2ImgPipeline")
    elif kind == "img2img":
        strength = _check_img2img(name, image, strength, latents, height, width, method)
    guidance = _default_guidance(pipe) if guidance_scale is None else guidance_scale
    engine_seed = 0 if seed is None else seed
    # the scheduler names a bad step count in its own terms, before the engine's config does
    steps = None if kind == "flow" else scheduler_grid(pipe.scheduler, num_inference_steps,
                                                        schedule_from_scheduler(pipe.scheduler))
    num_steps = num_inference_steps
    if kind == "img2img":
        grid = _truncated_grid(schedule_from_scheduler(pipe.scheduler), steps.grid, strength)
        num_steps = len(grid)
    # the scheduler's transition (and x̂0 processing) unless the user chose their own
    if steps is not None:
        method_options = {**dict(steps.engine_options), **method_options}
    # validate every engine option before any model runs (and read eta for the scheduler warning)
    config = make_config(method, n_particles=n, num_steps=num_steps, seed=engine_seed, batch_size=batch_size,
                         **method_options)
    if sharded is not False:  # every rank must make the same call before one population spans them
        agree_call({"pipeline": name, "prompt": prompts, "negative_prompt": negatives, "num_images_per_prompt": n,
                    "num_inference_steps": num_inference_steps, "method": method, "method options": method_options,
                    "guidance_scale": guidance, "height": height, "width": width, "seed": engine_seed,
                    "generator state": None if generator is None else generator.get_state(), "latents": latents,
                    "image": _as_tensor(image), "strength": strength,
                    "controlnet_conditioning_scale": controlnet_conditioning_scale,
                    "max_sequence_length": max_sequence_length}, "align()", _pipeline_device(pipe))
    if max_sequence_length is not None and kind != "flow":
        raise ValueError(f"{name} has no T5 encoder: max_sequence_length applies to SD3 / FLUX pipelines only")
    if kind == "flow":
        # the flow adapters take the grid from the pipeline's FlowMatchEuler scheduler (and warn if it is another)
        tokens = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        adapters = [(flow_denoiser_for(pipe, p, negative_prompt=neg, guidance_scale=guidance,
                                       num_inference_steps=num_inference_steps, height=height, width=width,
                                       batch_size=batch_size, **tokens), LatentImageReward(pipe, reward, batch_size))
                    for p, neg in zip(prompts, negatives)]
        grids = [denoiser.grid for denoiser, _ in adapters]
    else:
        if steps.replaced:
            warnings.warn(steps.warning(config.eta), SchedulerReplacedWarning, stacklevel=2)
        if kind == "img2img":  # the init image decides the size; encoded (and drawn) after the prompts
            init_image = _preprocess(pipe, image)
            height, width = int(init_image.shape[-2]), int(init_image.shape[-1])
        control = None
        if kind == "controlnet":  # the control image (resized to height / width if given) decides the size
            control = _preprocess_control(pipe, image, height, width)
            height, width = int(control.shape[-2]), int(control.shape[-1])
        adapters = [build_adapters(pipe, p, reward, guidance, neg, batch_size, height, width, control,
                                   1.0 if controlnet_conditioning_scale is None else controlnet_conditioning_scale)
                    for p, neg in zip(prompts, negatives)]
        grids = [grid if kind == "img2img" else steps.grid] * len(prompts)
    denoiser0 = adapters[0][0]
    sample_shape = tuple(denoiser0.sample_shape)
    takes_x_init = not issubclass(get_method(method).config_class, DTSConfig)  # a search tree has one root
    if kind == "img2img":
        draws = generator if generator is not None else torch.Generator().manual_seed(engine_seed)
        noised = _noised_init_latents(pipe, init_image, grid[0].alpha_bar, len(prompts) * n, draws)
        x_inits = list(noised.split(n))
    elif latents is not None:
        if kind == "flow" and isinstance(latents, Tensor) and latents.ndim == 3 and len(sample_shape) == 3:
            latents = _unpack_flux_latents(pipe, latents, sample_shape)  # FLUX's own packed layout
        x_inits: list[Tensor | None] = _split_latents(latents, len(prompts), n, sample_shape)
    elif generator is not None and takes_x_init:
        dtype = pipe.transformer.dtype if kind == "flow" else _latent_dtype(pipe)
        drawn = _draw_latents(generator, (len(prompts) * n, *sample_shape), denoiser0.device, dtype)
        x_inits = list(drawn.split(n))
    else:
        x_inits = [None] * len(prompts)
    if steps is not None and steps.latent_scale != 1.0 and kind != "img2img":  # a sigma-space x_T in VP terms
        x_inits = [None if x is None else x * steps.latent_scale for x in x_inits]
    if kind == "flow":  # the pipeline's latents are x_t at the first sigma; the engine's state is x_t / c(t)
        x_inits = [None if x is None else denoiser.initial_state(x) for x, (denoiser, _) in zip(x_inits, adapters)]
    if generator is not None:
        seeds = torch.randint(0, SEED_MAX, (len(prompts),), generator=generator, device=generator.device).tolist()
    else:
        seeds = [engine_seed + i for i in range(len(prompts))]

    for _, image_reward in adapters:  # their only reward call is on the final samples: decode those once
        if method in FINAL_REWARD_ONLY and output_type != "latent" and isinstance(image_reward, LatentImageReward):
            image_reward.keep_last = True
    results, watch = [], _CallbackWatch()
    for index, (p, (denoiser, image_reward)) in enumerate(zip(prompts, adapters)):
        result = sample(
            method=method, denoiser=denoiser, reward=image_reward, n_particles=n, num_steps=num_steps,
            seed=seeds[index], cond=p, batch_size=batch_size, progress=progress,
            callback=_step_callback(pipe, callback, callback_on_step_end, index, p, watch), grid=grids[index],
            x_init=x_inits[index], sharded=sharded, **method_options,
        )
        results.append(_output(pipe, p, result, image_reward, output_type))
    duplicated = [(i, r) for i, r in enumerate(results) if r.duplicates]
    if duplicated:
        where = ", ".join(f"{r.duplicates} of {r.ranking.numel()}" + (f" for prompt {i}" if not single else "")
                          for i, r in duplicated)
        warnings.warn(f"align(): {where} returned images are copies of another image: selection cloned particles "
                      "and nothing made the copies differ (eta=0 without rebirth noise, or a selection after the last "
                      "step); AlignResult.duplicates counts them", DuplicateImagesWarning, stacklevel=2)
    if flatten and not single:
        return AlignResult.flat(results)
    return results[0] if single else results


def _model_dtype(pipe: Any, output_type: str) -> torch.dtype:
    """The dtype the pipeline returns: latents in its denoiser's dtype, decoded "pt" images in its VAE's."""
    names = ("vae", "unet", "transformer") if output_type == "pt" else ("unet", "transformer")
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module_device_dtype(module)[1]
    return torch.float32


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


def _check_img2img(name: str, image: Any, strength: Any, latents: Any, height: Any, width: Any, method: str) -> float:
    """The img2img arguments, checked before any model runs; returns strength (diffusers' default 0.8)."""
    if image is None:
        raise ValueError(f"{name} needs an init image: pass image=... (and strength, default 0.8)")
    if isinstance(image, (list, tuple)) or (isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] != 1):
        raise ValueError(f"{name}: pass one init image (it is used for every prompt and image), not a batch")
    strength = 0.8 if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    for arg, value in (("latents", latents), ("height", height), ("width", width)):
        if value is not None:
            raise ValueError(f"{name} starts from its init image, whose size decides the output: {arg} does not apply")
    if issubclass(get_method(method).config_class, DTSConfig):
        raise ValueError(f"method {method!r} grows a search tree from one root x_T: it cannot start from the noised "
                         "init image; use a population method (fvd, smc, base, ...)")
    return float(strength)


def _check_controlnet(pipe: Any, image: Any, strength: Any, scale: Any, start: Any, end: Any, guess_mode: Any) -> float:
    """The ControlNet arguments, checked before any model runs; returns controlnet_conditioning_scale (default 1)."""
    name = type(pipe).__name__
    from diffusers import ControlNetModel

    controlnet = pipe.controlnet
    if not isinstance(controlnet, ControlNetModel):
        raise UnsupportedPipelineError(f"{name} with a {type(controlnet).__name__} is not supported by align(): only a "
                                       "single ControlNetModel (pass one ControlNet, not a MultiControlNetModel / list)")
    if getattr(controlnet.config, "global_pool_conditions", False):
        raise ValueError(f"{name}: the ControlNet has global_pool_conditions (the pipeline would run it in guess mode), "
                         "which align() does not support")
    if image is None:
        raise ValueError(f"{name} needs its control image: pass image=... (and controlnet_conditioning_scale, "
                         "default 1.0)")
    if isinstance(image, (list, tuple)) or (isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] != 1):
        raise ValueError(f"{name}: pass one control image (it is used for every prompt and image), not a batch or list")
    if strength is not None:
        raise ValueError(f"{name} takes a control image, not an init image: strength does not apply")
    if guess_mode not in (None, False):
        raise ValueError(f"{name}: guess_mode={guess_mode!r} is not supported by align() (only guess_mode=False)")
    for arg, value, only in (("control_guidance_start", start, 0.0), ("control_guidance_end", end, 1.0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != only):
            raise ValueError(f"{name}: {arg}={value!r} is not supported by align(): the ControlNet runs at every "
                             f"step ({arg}={only:g} only)")
    scale = 1.0 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"controlnet_conditioning_scale must be a number (one ControlNet), got {scale!r}")
    return float(scale)


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


def _unpack_flux_latents(pipe: Any, latents: Tensor, sample_shape: tuple[int, ...]) -> Tensor:
    """FLUX takes latents packed as [B, (h/2)(w/2), 4C]; the engine's particles are [B, C, h, w]."""
    channels, h, w = sample_shape
    if latents.shape[1:] != ((h // 2) * (w // 2), 4 * channels):
        raise ValueError(f"latents: expected FLUX's packed shape [B, {(h // 2) * (w // 2)}, {4 * channels}] or "
                         f"[B, {channels}, {h}, {w}], got {list(latents.shape)}")
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(latents, h * scale, w * scale, scale)


def _output(pipe: Any, prompt: str | None, result: SampleResult, image_reward: Any, output_type: str) -> AlignResult:
    ranking = rank_by_reward(result.rewards)
    nsfw = None
    if output_type == "latent":
        images: Any = result.samples[ranking.to(result.samples.device)].to(_model_dtype(pipe, "latent"))
    else:
        decoded, flags = _safety_check(pipe, image_reward.decode(result.samples))
        images = _format(decoded[ranking.to(decoded.device)], output_type)
        if output_type == "pt":  # as the pipeline returns them: in its VAE's dtype
            images = images.to(_model_dtype(pipe, "pt"))
        nsfw = None if flags is None else [flags[i] for i in ranking.tolist()]
    if isinstance(image_reward, LatentImageReward):
        result.cost.extra["vae_decodes"] = image_reward.decodes
    duplicates = int(result.samples.shape[0]) - result.diversity().distinct_samples
    return AlignResult(images=images, rewards=result.rewards[ranking], ranking=ranking, result=result,
                       nsfw_content_detected=nsfw, duplicates=duplicates, prompt=prompt)
