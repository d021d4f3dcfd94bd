"""Which diffusers pipeline classes ``align()`` drives, by class name, and why the others are refused.

An explicit allow-list: a pipeline is supported only if its exact class name is listed here
(a subclass may change ``__call__`` in ways ``align()`` cannot see). Every other class is
refused up front, before any model runs, with one :class:`UnsupportedPipelineError` line
naming the class, the reason, and what is supported. The reasons come from the class name
(other img2img / inpaint / ControlNet variants would silently lose their image, mask or control
input; DiT / PixArt are VP transformer pipelines; Kandinsky / unCLIP are multi-stage).
"""

from __future__ import annotations

from typing import Any

from fvdiffusion.errors import UnsupportedPipelineError

# class name -> kind: "t2i" (UNet2DConditionModel + VAE + text encoder), "img2img", "controlnet" (SD with one
# ControlNetModel, its control image passed through), "pixel" (UNet2DModel,
# unconditional), "flow" (SD3 / FLUX transformers, see .flow)
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "t2i",
    "StableDiffusionXLPipeline": "t2i",
    "StableDiffusionImg2ImgPipeline": "img2img",
    "StableDiffusionControlNetPipeline": "controlnet",
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "StableDiffusion3Pipeline": "flow",
    "FluxPipeline": "flow",
}

_IMAGE_INPUT = "its init `image` (and `strength`) would be dropped: align() starts from pure noise"
# (substrings of the class name, reason); the first match wins
_REFUSALS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Control", "Adapter"),
     "its control image goes to a ControlNet / adapter on every denoiser call, and align() would drop it"),
    (("Inpaint", "Fill"), "its init `image` and `mask_image` would be dropped: align() starts from pure noise"),
    (("Img2Img", "Image2Image", "ImageToImage", "Depth2Img", "Pix2Pix", "Upscale", "Variation", "Refiner",
      "Kontext", "Redux"), _IMAGE_INPUT),
    (("DiT", "PixArt"),
     "a VP diffusion transformer pipeline (not flow-matching): align()'s VP adapters take UNet pipelines only, "
     "so transformer pipelines other than SD3 / FLUX are not supported yet"),
    (("Kandinsky", "UnCLIP", "Wuerstchen", "StableCascade", "Prior", "IFPipeline", "IFSuperResolution"),
     "a multi-stage pipeline (a prior or a cascade of image models) that align() cannot drive as one denoiser"),
    (("Video", "Audio", "Animate", "Music", "ShapE", "Stable3D", "I2V", "T2V"),
     "not a single-image pipeline"),
)


def supported_pipelines() -> str:
    return ", ".join(SUPPORTED_PIPELINES)


def refusal_reason(name: str) -> str:
    """Why the pipeline class ``name`` is not supported (a generic reason when no family matches)."""
    for needles, reason in _REFUSALS:
        if any(needle in name for needle in needles):
            return reason
    return "it is not on align()'s list of pipelines whose inputs it fully takes"


def pipeline_kind(pipe: Any) -> str:
    """"t2i", "img2img", "controlnet", "pixel" or "flow" for a supported pipeline; else one UnsupportedPipelineError line.

    Reads only the class name before refusing, so nothing of the pipeline is touched (or run).
    """
    name = type(pipe).__name__
    kind = SUPPORTED_PIPELINES.get(name)
    if kind is None:
        raise UnsupportedPipelineError(f"{name} is not supported by align(): {refusal_reason(name)}; "
                                       f"supported: {supported_pipelines()}")
    # the listed class with the components its kind needs (a pipeline built with some left out)
    needs = {"t2i": ("unet", "vae", "scheduler"), "img2img": ("unet", "vae", "scheduler"),
             "controlnet": ("unet", "vae", "scheduler", "controlnet"), "pixel": ("unet", "scheduler"), "flow": ("transformer", "vae", "scheduler")}
    missing = [attr for attr in needs[kind] if getattr(pipe, attr, None) is None]
    if missing:
        raise UnsupportedPipelineError(f"{name} has no {', '.join('`' + m + '`' for m in missing)}: align() needs "
                                       f"the pipeline's {', '.join(needs[kind])}")
    return kind
