"""fvdiffusion: inference-time reward alignment of diffusion models with particle populations.

The public names are resolved on first use (PEP 562), so that importing a torch-free part of the
package (``fvdiffusion.errors``, the ``fvd`` command and its ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers (and the import graph tests/core/test_layout.py reads)
    from fvdiffusion.api import sample
    from fvdiffusion.errors import ConfigError
    from fvdiffusion.integrations.diffusers import AlignResult, align
    from fvdiffusion.result import Cost, Lineage, SampleResult, StepTrace
    from fvdiffusion.samplers import METHODS, make_config
    from fvdiffusion.schedule import VPSchedule

__version__ = "0.1.0"

__all__ = ["sample", "align", "AlignResult", "METHODS", "make_config", "ConfigError", "SampleResult", "Lineage", "Cost", "StepTrace",
           "VPSchedule", "__version__"]

# public name -> the module that defines it
_LAZY = {
    "sample": "fvdiffusion.api",
    "align": "fvdiffusion.integrations.diffusers",
    "AlignResult": "fvdiffusion.integrations.diffusers",
    "METHODS": "fvdiffusion.samplers",
    "make_config": "fvdiffusion.samplers",
    "ConfigError": "fvdiffusion.errors",
    "SampleResult": "fvdiffusion.result",
    "Lineage": "fvdiffusion.result",
    "Cost": "fvdiffusion.result",
    "StepTrace": "fvdiffusion.result",
    "VPSchedule": "fvdiffusion.schedule",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
