"""diffusers pipelines driven by the engine: denoiser adapters, latent / pixel rewards, ``align()``.

Nothing here imports diffusers: the adapters work on the objects the user already holds
(duck-typed on their ``config`` attributes), so the only requirement is the extra that
built those objects (``pip install -e '.[diffusers]'`` in the clone). Code that loads a
pipeline itself (``fvdiffusion.bench.t2i``) imports diffusers through
:func:`~fvdiffusion.rewards.model_rewards.require`, which names that extra when it is missing.
"""

from fvdiffusion.errors import UnsupportedPipelineError
from fvdiffusion.integrations.diffusers.align import AlignResult, align, build_adapters
from fvdiffusion.integrations.diffusers.denoisers import (
    StableDiffusionDenoiser,
    UNet2DModelDenoiser,
    prediction_type_from_scheduler,
    schedule_from_scheduler,
)
from fvdiffusion.integrations.diffusers.flow import FluxDenoiser, SD3Denoiser, flow_denoiser_for
from fvdiffusion.integrations.diffusers.rewards import LatentImageReward, PixelImageReward

__all__ = [
    "align", "AlignResult", "UnsupportedPipelineError", "build_adapters",
    "StableDiffusionDenoiser", "UNet2DModelDenoiser", "prediction_type_from_scheduler", "schedule_from_scheduler",
    "LatentImageReward", "PixelImageReward", "SD3Denoiser", "FluxDenoiser", "flow_denoiser_for",
]
