"""Denoisers: anything mapping (x_t, t, cond) to an eps / x0 / v prediction."""

from fvdiffusion.denoisers.base import Denoiser, ModuleDenoiser, CountingDenoiser
from fvdiffusion.denoisers.flow_matching import FlowMatchingDenoiser

__all__ = ["Denoiser", "ModuleDenoiser", "CountingDenoiser", "FlowMatchingDenoiser"]
