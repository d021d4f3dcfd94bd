"""One module per method; :data:`METHODS` maps a method name to its config and sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fvdiffusion.samplers.base import BaseConfig, BestOfNConfig, sample_base, sample_bon
from fvdiffusion.samplers.config import CommonConfig, ConfigError, did_you_mean
from fvdiffusion.samplers.fvd import FVDConfig, sample_fvd
from fvdiffusion.samplers.smc import SMCConfig, sample_smc
from fvdiffusion.samplers.vasr import VASRConfig, sample_vasr


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[CommonConfig]
    run: Callable
    needs_reward_during_sampling: bool
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("base", BaseConfig, sample_base, False, "independent samples of the base sampler"),
        Method("bon", BestOfNConfig, sample_bon, False, "best-of-N: independent samples ranked by final reward"),
        Method("smc", SMCConfig, sample_smc, True, "SMC / Feynman-Kac steering with a resampling scheme"),
        Method("vasr", VASRConfig, sample_vasr, True, "systematic resampling on mass w*exp(lam*r)"),
        Method("fvd", FVDConfig, sample_fvd, True, "Fleming-Viot birth-death with rebirth noise"),
    ]
}


def register_method(method: Method) -> None:
    """Add a method (used by the value-based samplers, which live in their own modules)."""
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
           "SMCConfig", "FVDConfig", "VASRConfig", "ConfigError"]

# The value-based samplers register themselves; imported last because they use register_method.
import fvdiffusion.samplers.dts  # noqa: E402,F401
import fvdiffusion.samplers.svdd  # noqa: E402,F401
