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

``align()`` runs four stages, each a function of this package: **parse** (:func:`.align_call.parse_call`: the
arguments checked and normalised into an :class:`~.align_call.AlignCall`), **plan** (:func:`.align_plan.plan_call`:
per pipeline kind the scheduler's grid and engine options, the adapters, grids, x_T and seeds of each prompt, an
:class:`~.align_plan.AlignPlan`), **sample** (:func:`sample_plan`: the engine on each prompt's population) and
**output** (:func:`build_output`: the ranked :class:`AlignResult` of each prompt).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from fvdiffusion.api import sample
from fvdiffusion.errors import CallbackChangesIgnoredWarning, DuplicateImagesWarning
from fvdiffusion.integrations.diffusers._batching import module_device_dtype
from fvdiffusion.integrations.diffusers.align_call import (
    DEFAULT_GUIDANCE,
    DEFAULT_PARTICLES,
    OUTPUT_TYPES,
    AlignCall,
    parse_call,
)
from fvdiffusion.integrations.diffusers.align_plan import (
    FINAL_REWARD_ONLY,
    AlignPlan,
    build_adapters,
    plan_call,
)
from fvdiffusion.integrations.diffusers.rewards import LatentImageReward
from fvdiffusion.loop import StepEvent
from fvdiffusion.result import SampleResult
from fvdiffusion.rewards.image_rewards import ImageReward
from fvdiffusion.rewards.model_rewards import require

# the stages, and the names this module has always had (build_adapters, the defaults) wherever they live now
__all__ = ["align", "AlignResult", "build_adapters", "to_pil", "rank_by_reward", "parse_call", "plan_call",
           "sample_plan", "build_output", "AlignCall", "AlignPlan", "OUTPUT_TYPES", "DEFAULT_PARTICLES",
           "DEFAULT_GUIDANCE", "FINAL_REWARD_ONLY"]

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
    call = parse_call(
        pipe, prompt, reward, method=method, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        negative_prompt=negative_prompt, height=height, width=width, generator=generator, seed=seed, latents=latents,
        num_images_per_prompt=num_images_per_prompt, n_particles=n_particles, output_type=output_type,
        callback_on_step_end=callback_on_step_end, callback=callback, batch_size=batch_size, progress=progress,
        max_sequence_length=max_sequence_length, image=image, strength=strength,
        controlnet_conditioning_scale=controlnet_conditioning_scale, control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end, guess_mode=guess_mode, sharded=sharded, flatten=flatten,
        method_options=method_options,
    )
    plan = plan_call(pipe, call)
    return build_output(pipe, call, plan, sample_plan(pipe, call, plan))


# --- sample ------------------------------------------------------------------------------------

def sample_plan(pipe: Any, call: AlignCall, plan: AlignPlan) -> Iterator[SampleResult]:
    """Run :func:`fvdiffusion.sample` on each prompt's population, yielding its result before the next one starts:
    :func:`build_output` turns prompt i's result into images (and frees what its reward kept) before i + 1 runs."""
    watch = _CallbackWatch()
    for index, (p, (denoiser, image_reward)) in enumerate(zip(call.prompts, plan.adapters)):
        yield sample(
            method=call.method, denoiser=denoiser, reward=image_reward, n_particles=call.n, num_steps=plan.num_steps,
            seed=plan.seeds[index], cond=p, batch_size=call.batch_size, progress=call.progress,
            callback=_step_callback(pipe, call.callback, call.callback_on_step_end, index, p, watch),
            grid=plan.grids[index], x_init=plan.x_inits[index], sharded=call.sharded, **plan.method_options,
        )


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


# --- output ------------------------------------------------------------------------------------

def build_output(pipe: Any, call: AlignCall, plan: AlignPlan,
                 results: Iterable[SampleResult]) -> AlignResult | list[AlignResult]:
    """Each prompt's :class:`AlignResult` (one, a list, or one flat result), with one warning for duplicated images."""
    aligned = []
    for p, (_, image_reward), result in zip(call.prompts, plan.adapters, results):
        aligned.append(_output(pipe, p, result, image_reward, call.output_type))
    duplicated = [(i, r) for i, r in enumerate(aligned) if r.duplicates]
    if duplicated:
        where = ", ".join(f"{r.duplicates} of {r.ranking.numel()}" + (f" for prompt {i}" if not call.single else "")
                          for i, r in duplicated)
        warnings.warn(f"align(): {where} returned images are copies of another image: selection cloned particles "
                      "and nothing made the copies differ (eta=0 without rebirth noise, or a selection after the last "
                      "step); AlignResult.duplicates counts them", DuplicateImagesWarning, stacklevel=3)
    if call.flatten and not call.single:
        return AlignResult.flat(aligned)
    return aligned[0] if call.single else aligned


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


def _model_dtype(pipe: Any, output_type: str) -> torch.dtype:
    """The dtype the pipeline returns: latents in its denoiser's dtype, decoded "pt" images in its VAE's."""
    names = ("vae", "unet", "transformer") if output_type == "pt" else ("unet", "transformer")
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module_device_dtype(module)[1]
    return torch.float32


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

