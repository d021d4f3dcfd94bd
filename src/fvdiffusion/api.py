"""The one public entry point: ``fvdiffusion.sample(method=..., denoiser=..., reward=..., ...)``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import Tensor

from fvdiffusion.denoisers.base import Denoiser
from fvdiffusion.loop import StepEvent
from fvdiffusion.schedule import StepGrid
from fvdiffusion.result import SampleResult
from fvdiffusion.rewards.base import Reward
from fvdiffusion.samplers import CommonConfig, get_method, make_config


def sample(
    method: str,
    denoiser: Denoiser,
    reward: Reward | None = None,
    n_particles: int = 64,
    num_steps: int = 50,
    seed: int = 0,
    cond: Any = None,
    lam: float = 1.0,
    eta: float = 1.0,
    batch_size: int | None = None,
    progress: bool = False,
    config: CommonConfig | None = None,
    callback: Callable[[StepEvent], Any] | None = None,
    grid: StepGrid | None = None,
    x_init: Tensor | None = None,
    sharded: bool | None = None,
    **method_options: Any,
) -> SampleResult:
    """Sample N particles with ``method`` and return a :class:`SampleResult`.

    Either pass a ready ``config`` (its class must match the method) or the common fields
    plus any method option (e.g. ``rebirth_noise=0.5`` for fvd, ``scheme="systematic"``
    for smc). Options are validated; an unknown one raises an error naming it. With ``config``, a
    method option or a common keyword that differs from both its default and the config is refused
    (it would be ignored).

    The engine is gradient-free and defends its own state: it runs under ``torch.no_grad()`` and
    detaches what the models return (no autograd graph survives a step), hands the denoiser and the
    reward copies of its tensors (a model that writes into its input changes nothing), casts a
    floating denoiser output to the population's float32, and refuses in one line an output that
    is not real floating (int, bool, complex) or lives on another device.

    ``callback``, if given, is called after every denoising step with a
    :class:`~fvdiffusion.loop.StepEvent` (the step, the population, the step's trace row). It
    observes only: its return value is ignored, and it must not modify the tensors it sees
    (they are the engine's own; clone what you keep). Asking for it reads each step's numbers
    on the host, like a progress bar does.

    ``grid`` (a :class:`~fvdiffusion.schedule.StepGrid` of ``num_steps`` steps) replaces the evenly
    spaced default, e.g. with the timesteps a diffusers scheduler chose; ``x_init``
    [n_particles, *sample_shape] replaces the initial noise (the seed still drives everything else).

    In an initialised ``torch.distributed`` process group (torchrun, ``fvd sample --nproc``) the
    population is spread over the ranks — each runs the denoiser and the reward on its block —
    and every rank returns the whole result, equal to one process with the same ``noise_chunk``
    (docs/distributed.md). ``sharded=False`` keeps the whole population in this process.
    """
    spec = get_method(method)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable taking a StepEvent, got {type(callback).__name__}")
    if callback is not None and method in TREE_METHODS:
        # a tree search has no population stepped k = K … 1 to show a callback: refuse rather than ignore it
        raise ValueError(f"callback: {method} grows a search tree, not a population stepped from K to 1, so it "
                         "calls no per-step callback; read result.trace after the run (or pass progress=True)")
    if config is None:
        config = make_config(method, n_particles=n_particles, num_steps=num_steps, seed=seed, lam=lam, eta=eta,
                             batch_size=batch_size, **method_options)
    elif not isinstance(config, spec.config_class):
        raise TypeError(f"config for method {method!r} must be a {spec.config_class.__name__}, "
                        f"got {type(config).__name__}")
    else:
        _refuse_keywords_beside_config(config, method_options, n_particles=n_particles, num_steps=num_steps,
                                       seed=seed, lam=lam, eta=eta, batch_size=batch_size)
    if reward is None and spec.needs_reward_during_sampling:
        raise ValueError(f"method {method!r} needs a reward; got reward=None")
    return spec.run(denoiser, reward, config, cond=cond, progress=progress, callback=callback, grid=grid,
                    x_init=x_init, sharded=sharded)


TREE_METHODS = ("dts", "dts*")


def _refuse_keywords_beside_config(config: CommonConfig, options: dict[str, Any], **common: Any) -> None:
    """config= is the whole configuration: a method option beside it, or a common keyword set to a value
    other than its default and the config's, would be silently ignored, so it is refused in one line."""
    if options:
        raise TypeError(f"sample() got config= and the method option(s) {', '.join(sorted(options))}: put them in "
                        f"the config (dataclasses.replace(config, ...)) or pass no config")
    defaults = {name: p.default for name, p in inspect.signature(sample).parameters.items()}
    clashing = [f"{name}={value!r} (config has {getattr(config, name)!r})" for name, value in common.items()
                if value != defaults[name] and value != getattr(config, name)]
    if clashing:
        raise TypeError(f"sample() got config= and {', '.join(clashing)}: pass the settings in the config or as "
                        f"keywords, not both")
