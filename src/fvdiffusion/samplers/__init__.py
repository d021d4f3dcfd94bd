"""One module per method; :data:`METHODS` is the explicit list of them (no import side effects).

Each method is a config class and a factory that builds its :class:`~fvdiffusion.loop.ParticleKernel`
(population methods) or :class:`~fvdiffusion.loop.Sampler` (tree and candidate methods) from a
config; :func:`fvdiffusion.loop.run_kernel` runs either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fvdiffusion.config import CommonConfig, did_you_mean
from fvdiffusion.errors import ConfigError
from fvdiffusion.loop import ParticleKernel, Sampler, StepEvent, run_kernel
from fvdiffusion.result import SampleResult
from fvdiffusion.samplers.base import BaseConfig, BaseKernel, BestOfNConfig, BestOfNKernel
from fvdiffusion.samplers.dts import DTSConfig, DTSSampler, DTSStarConfig
from fvdiffusion.samplers.fvd import FVDConfig, FVDKernel
from fvdiffusion.samplers.smc import SMCConfig, SMCKernel
from fvdiffusion.samplers.svdd import SVDDConfig, SVDDSampler
from fvdiffusion.samplers.vasr import VASRConfig, VASRKernel
from fvdiffusion.schedule import StepGrid


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[CommonConfig]
    kernel: Callable[[Any], ParticleKernel | Sampler]  # config -> the kernel or sampler that runs it
    needs_reward_during_sampling: bool
    summary: str

    def run(self, denoiser, reward, config: CommonConfig, cond: Any = None, progress: bool = False,
            callback: Callable[[StepEvent], Any] | None = None, grid: StepGrid | None = None,
            x_init: Any = None, sharded: bool | None = None) -> SampleResult:
        return run_kernel(self.name, self.kernel(config), denoiser, reward, config, cond=cond, progress=progress,
                          callback=callback, grid=grid, x_init=x_init, sharded=sharded)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("base", BaseConfig, BaseKernel, False, "independent samples of the base sampler"),
        Method("bon", BestOfNConfig, BestOfNKernel, False, "best-of-N: independent samples ranked by final reward"),
        Method("smc", SMCConfig, SMCKernel, True, "SMC / Feynman-Kac steering with a resampling scheme"),
        Method("vasr", VASRConfig, VASRKernel, True, "systematic resampling on mass w*exp(lam*r)"),
        Method("fvd", FVDConfig, FVDKernel, True, "Fleming-Viot birth-death with rebirth noise"),
        Method("svdd", SVDDConfig, SVDDSampler, True,
               "SVDD-PM: M base-kernel candidates per step, keep one by softmax(lam*r(x0_hat))"),
        Method("dts", DTSConfig, DTSSampler, True,
               "diffusion tree sampling: Boltzmann descent over soft values, base-kernel expansion"),
        Method("dts*", DTSStarConfig, DTSSampler, True, "greedy diffusion tree search: argmax descent over soft values"),
    ]
}


def register_method(method: Method) -> None:
    """Add a user-defined method to the registry (the built-in ones are listed above)."""
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"invalid method={name!r}: expected one of {', '.join(METHODS)}{did_you_mean(name, METHODS)}")
    return METHODS[name]


def make_config(method: str, **options) -> CommonConfig:
    """Build and validate the config of ``method``; unknown option names are errors."""
    spec = get_method(method)
    unknown = sorted(set(options) - spec.config_class.field_names())
    if unknown:
        valid = spec.config_class.field_names()
        raise ConfigError(
            f"invalid option {unknown[0]!r} for method {method!r}{did_you_mean(unknown[0], valid)}: "
            f"valid options are {', '.join(sorted(valid))}"
        )
    return spec.config_class(**options)


__all__ = ["METHODS", "Method", "get_method", "make_config", "register_method", "BaseConfig", "BestOfNConfig",
           "SMCConfig", "FVDConfig", "VASRConfig", "SVDDConfig", "DTSConfig", "DTSStarConfig", "ConfigError"]
