"""``align()``'s first stage, *parse*: check and normalise the call's arguments into one :class:`AlignCall`.

Nothing here runs a model or draws a random number: every argument the pipeline's kind refuses, every
malformed prompt list, particle count, generator, size, guidance, callback or image argument is one
clear error before any model runs. What needs the scheduler (the step count) or the method's config
(its options) is checked by the next stage, :mod:`.align_plan`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.errors import UnsupportedPipelineError
from fvdiffusion.integrations.diffusers.pipelines import pipeline_kind
from fvdiffusion.loop import StepEvent
from fvdiffusion.rewards.image_rewards import ImageReward
from fvdiffusion.samplers import get_method
from fvdiffusion.samplers.dts import DTSConfig

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_PARTICLES = 8
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class AlignCall:
    """One ``align()`` call, checked and normalised: what the plan, sample and output stages read."""

    pipe_name: str                     # type(pipe).__name__, as the error messages name it
    kind: str                          # "t2i", "img2img", "controlnet", "pixel" or "flow" (:mod:`.pipelines`)
    reward: ImageReward
    prompts: list[str | None]          # one entry per population ([None] for an unconditional pipeline)
    single: bool                       # one prompt was given (not a list): one AlignResult comes back
    negatives: list[str | None]        # the negative prompt of each prompt
    n: int                             # particles (images) per prompt
    method: str
    method_options: dict[str, Any]     # the user's engine options (the scheduler's are merged under them by the plan)
    num_inference_steps: int
    guidance: float                    # guidance_scale, or the pipeline's own default
    height: int | None
    width: int | None
    generator: torch.Generator | None
    engine_seed: int                   # seed, default 0 (used without a generator)
    latents: Tensor | None
    image: Any                         # the init image (img2img) or the control image (controlnet)
    strength: float | None             # img2img only (default 0.8)
    controlnet_conditioning_scale: float | None  # controlnet only (default 1.0)
    max_sequence_length: int | None
    output_type: str
    callback_on_step_end: Callable[..., Any] | None
    callback: Callable[[StepEvent], Any] | None
    batch_size: int | None
    progress: bool
    sharded: bool | None
    flatten: bool


def parse_call(
    pipe: Any,
    prompt: Any,
    reward: ImageReward,
    *,
    method: str,
    num_inference_steps: int,
    guidance_scale: Any,
    negative_prompt: Any,
    height: Any,
    width: Any,
    generator: Any,
    seed: Any,
    latents: Any,
    num_images_per_prompt: Any,
    n_particles: Any,
    output_type: Any,
    callback_on_step_end: Any,
    callback: Any,
    batch_size: Any,
    progress: bool,
    max_sequence_length: Any,
    image: Any,
    strength: Any,
    controlnet_conditioning_scale: Any,
    control_guidance_start: Any,
    control_guidance_end: Any,
    guess_mode: Any,
    sharded: Any,
    flatten: Any,
    method_options: dict[str, Any],
) -> AlignCall:
    """``align()``'s arguments (the same names) checked, in a fixed order, and normalised into an :class:`AlignCall`."""
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
    kind = pipeline_kind(pipe)
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
    return AlignCall(
        pipe_name=name, kind=kind, reward=reward, prompts=prompts, single=single, negatives=negatives, n=n,
        method=method, method_options=method_options, num_inference_steps=num_inference_steps,
        guidance=_default_guidance(pipe) if guidance_scale is None else guidance_scale, height=height, width=width,
        generator=generator, engine_seed=0 if seed is None else seed, latents=latents, image=image, strength=strength,
        controlnet_conditioning_scale=controlnet_conditioning_scale, max_sequence_length=max_sequence_length,
        output_type=output_type, callback_on_step_end=callback_on_step_end, callback=callback, batch_size=batch_size,
        progress=progress, sharded=sharded, flatten=flatten,
    )


# --- the checks, in the order parse_call makes them ------------------------------------------------

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


def _default_guidance(pipe: Any) -> float:
    """The pipeline's own default guidance_scale (7.5 for SD, 5.0 for SDXL), else 7.5."""
    try:
        default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return DEFAULT_GUIDANCE
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else DEFAULT_GUIDANCE
