"""fvdiffusion: inference-time reward alignment of diffusion models with particle populations."""

from fvdiffusion.api import sample
from fvdiffusion.integrations.diffusers import AlignResult, align
from fvdiffusion.result import Cost, Lineage, SampleResult, StepTrace
from fvdiffusion.samplers import METHODS, ConfigError, make_config
from fvdiffusion.schedule import VPSchedule

__version__ = "0.1.0"

__all__ = ["sample", "align", "AlignResult", "METHODS", "make_config", "ConfigError", "SampleResult", "Lineage", "Cost", "StepTrace",
           "VPSchedule", "__version__"]
