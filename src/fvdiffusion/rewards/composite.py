"""A weighted sum of rewards, r = Σ_j λ_j r_j (DAS's multi-objective alignment).

Each term keeps its own conventions: it gets the prompt as it declares it
(:mod:`fvdiffusion.rewards.calling`) and its return is checked and converted on its own, so an
error names the term. The weights put rewards of different scales on one footing (CLIP score is
100 · cosine, PickScore ≈ 20 · cosine, brightness is in [0, 1]); docs/diffusers.md gives a λ per scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fvdiffusion.rewards.calling import call_reward, reward_name


@dataclass(frozen=True)
class RewardTerm:
    """One term λ · r of a :class:`WeightedSum`."""

    reward: Callable[..., Any]
    weight: float
    name: str


class WeightedSum:
    """``WeightedSum({"clip": (clip, 0.05), "aesthetic": (aesthetic, 1.0)})`` or
    ``WeightedSum([(clip, 0.05), (aesthetic, 1.0)])``: r(x, prompt) = Σ λ_j r_j(x, prompt).

    Usable wherever one reward is (``align()``'s image reward, ``fvdiffusion.sample``'s reward).
    ``last_terms`` holds each term's unweighted values from the latest call, to see what each contributed.
    """

    prompts_as_list = False  # it takes the prompt as given and hands each term the form it declares

    def __init__(self, terms: dict[str, tuple[Callable[..., Any], float]] | list[tuple[Callable[..., Any], float]]
                 ) -> None:
        items = list(terms.items()) if isinstance(terms, dict) else [(None, term) for term in terms]
        if not items:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        built = []
        for key, term in items:
            if not isinstance(term, tuple) or len(term) != 2:
                raise ValueError(f"WeightedSum: each term is a (reward, weight) pair, got {term!r}")
            reward, weight = term
            name = key if key is not None else reward_name(reward)
            if not callable(reward):
                raise TypeError(f"WeightedSum: term {name!r} is not callable ({type(reward).__name__})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"WeightedSum: the weight of term {name!r} must be a finite number, got {weight!r}")
            built.append(RewardTerm(reward=reward, weight=float(weight), name=name))
        self.terms = tuple(built)
        self.name = " + ".join(f"{t.weight:g}·{t.name}" for t in self.terms)
        self.last_terms: dict[str, Tensor] = {}

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for term in self.terms:
            values = call_reward(term.reward, x, cond, where=f"(term {term.name!r} of the weighted sum)")
            self.last_terms[term.name] = values.detach()
            total = total + term.weight * values.to(torch.float64)
        return total
