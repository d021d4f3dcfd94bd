"""Every exception and warning the library raises on purpose, in one leaf module."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the value."""


class RewardError(RuntimeError):
    """The reward raised or returned something the engine cannot use."""


class DenoiserError(ValueError):
    """The denoiser raised, returned the wrong shape, or returned NaN/inf; the message names the step."""


class NonFiniteRewardWarning(RuntimeWarning):
    """Some rewards of a run were NaN/±inf; those particles got zero weight. Issued once per run."""


class AllParticlesDeadWarning(NonFiniteRewardWarning):
    """At one or more steps every particle had potential −inf; weights were reset to uniform there."""


class NonFiniteDenoiserWarning(RuntimeWarning):
    """With nonfinite_denoiser="kill", some denoiser outputs were NaN/±inf and those particles were
    killed (reborn as copies of survivors). Issued once per run, with the counts."""
