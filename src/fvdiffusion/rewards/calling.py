"""How the engine and the integrations call a user's reward: the prompt in the form the reward
declares, and what it returns turned into a float Tensor [B] or refused in one line.

A reward written for DAS-style code, ``reward(images, prompts)`` indexing ``prompts[i]``, would
otherwise index the characters of one prompt string. A reward gets the prompt as a list of B
strings (one per image) when it says so with a ``prompts_as_list = True`` attribute, or, when it
has no such attribute, when its second parameter is named ``prompts`` (plural).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.errors import RewardError

LIST_PARAMETER_NAMES = ("prompts",)  # a second parameter named so expects one prompt per image


def reward_name(reward: Any) -> str:
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward, "__name__", None) or type(reward).__name__


def takes_prompt_list(reward: Callable[..., Any]) -> bool:
    """Whether ``reward`` wants one prompt per image: its ``prompts_as_list`` attribute, else its signature."""
    declared = getattr(reward, "prompts_as_list", None)
    if declared is not None:
        return bool(declared)
    try:
        parameters = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) >= 2 and parameters[1].name in LIST_PARAMETER_NAMES


def prompt_argument(reward: Callable[..., Any], cond: Any, batch: int) -> Any:
    """``cond`` as ``reward`` declares it: a prompt string becomes ``[prompt] * batch`` for a list-taking reward."""
    if isinstance(cond, str) and takes_prompt_list(reward):
        return [cond] * batch
    return cond


def as_reward_tensor(values: Any, batch: int, name: str, where: str = "") -> Tensor:
    """A reward's return as a float Tensor [batch]: lists, tuples and numpy arrays of numbers are
    converted, a 0-d value is accepted for one image; anything else is one line naming the reward."""
    expected = f"expected a float tensor of shape ({batch},), one reward per image"
    at = f" {where}" if where else ""
    if not isinstance(values, Tensor):
        if isinstance(values, (list, tuple)) or type(values).__module__ == "numpy":
            kind = type(values).__name__
            try:
                values = torch.as_tensor(values if type(values).__module__ == "numpy" else list(values))
            except Exception:
                raise RewardError(f"reward {name!r} returned a {kind} that is not numbers{at}: {expected}") from None
            if values.dtype == torch.bool or values.is_complex():
                raise RewardError(f"reward {name!r} returned a {kind} of {values.dtype}{at}: {expected}")
            values = values.to(torch.float64)  # a list of ints (a count) is a list of numbers too
        else:
            raise RewardError(f"reward {name!r} returned {type(values).__name__}{at}: {expected}")
    if values.ndim == 0 and batch == 1:  # one image, one number: unambiguous
        values = values.reshape(1)
    if values.ndim == 0:
        raise RewardError(f"reward {name!r} returned one number (a 0-d tensor) for {batch} images{at}: {expected} "
                          f"(did it reduce over the batch?)")
    if tuple(values.shape) != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)}{at}: {expected}")
    if not torch.is_floating_point(values):
        raise RewardError(f"reward {name!r} returned dtype {values.dtype}{at}: {expected}")
    return values


def call_reward(reward: Callable[..., Any], x: Tensor, cond: Any = None, where: str = "") -> Tensor:
    """``reward(x, cond)`` with the prompt as the reward declares it, returning a float Tensor [B] on x's device."""
    out = reward(x, prompt_argument(reward, cond, x.shape[0]))
    return as_reward_tensor(out, x.shape[0], reward_name(reward), where).to(x.device)
