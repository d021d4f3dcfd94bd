"""Does a feature space see collapse? A few real digits repeated vs a diverse real set.

For each class: ``n`` distinct train digits (the diverse set) and ``distinct`` other train
digits repeated to ``n`` rows (the collapsed set, what a sampler whose population fell onto
a few lineages returns), both with the same tiny pixel noise so neither set is exactly
degenerate, scored by FID and KID against the held-out reference digits of the class. A
feature space fit for judging samplers must give the collapsed set a far worse score.

The jittered set is the collapsed set with each row moved by a small random rotation,
shift and scale — the evaluation network's own training augmentation — like a population
that collapsed onto a few lineages and then drifted a little: near-copies that a feature
space invariant to those moves cannot tell from distinct digits.
Used by tests/harness/test_feature_space.py and scripts/feature_space_table.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from fvdiffusion.metrics.feature_spaces import image_features
from fvdiffusion.metrics.images import FeatureFID, FeatureKID


@dataclass(frozen=True)
class CollapseSets:
    """One class's image sets, all [*, 1, 28, 28] in [-1, 1]."""

    cls: int
    distinct: int  # distinct digits in the collapsed set
    reference: Tensor
    diverse: Tensor
    collapsed: Tensor
    jittered: Tensor


@dataclass(frozen=True)
class CollapseRow:
    space: str
    cls: int
    n: int
    distinct: int
    fid_diverse: float
    fid_collapsed: float
    fid_jittered: float
    kid_diverse: float
    kid_collapsed: float
    kid_jittered: float

    @property
    def fid_ratio(self) -> float:
        """FID(collapsed) / FID(diverse)."""
        return self.fid_collapsed / self.fid_diverse

    @property
    def fid_ratio_jittered(self) -> float:
        """FID(jittered) / FID(diverse)."""
        return self.fid_jittered / self.fid_diverse

    def as_dict(self) -> dict:
        return {**asdict(self), "fid_ratio": self.fid_ratio, "fid_ratio_jittered": self.fid_ratio_jittered}


def collapse_sets(cls: int, n: int = 200, distinct: int = 4, noise: float = 0.01, seed: int = 0) -> CollapseSets:
    """The reference, diverse and collapsed sets of class ``cls`` (disjoint digits; needs the MNIST data)."""
    from fvdiffusion.train.classifier import ClassifierTrainConfig, augment
    from fvdiffusion.zoo.mnist_data import load_mnist

    if not 1 <= distinct < n:
        raise ValueError(f"distinct must be in [1, n), got distinct={distinct}, n={n}")
    train, reference = load_mnist("train"), load_mnist("reference")
    pool = train.images[train.labels == cls]
    if pool.shape[0] < n + distinct:
        raise ValueError(f"class {cls} has {pool.shape[0]} train digits, need n + distinct = {n + distinct}")
    generator = torch.Generator().manual_seed(seed * 10 + cls)
    order = torch.randperm(pool.shape[0], generator=generator)
    diverse = pool[order[:n]]
    collapsed = pool[order[n: n + distinct]].repeat((n + distinct - 1) // distinct, 1, 1, 1)[:n]
    noise_pair = noise * torch.randn((2, n, 1, 28, 28), generator=generator)
    jittered = augment(collapsed, ClassifierTrainConfig.for_kind("eval"), generator)
    return CollapseSets(
        cls=cls, distinct=distinct, reference=reference.images[reference.labels == cls],
        diverse=(diverse + noise_pair[0]).clamp(-1, 1), collapsed=(collapsed + noise_pair[1]).clamp(-1, 1),
        jittered=jittered,
    )


def collapse_row(sets: CollapseSets, space: str) -> CollapseRow:
    """FID and KID of the diverse, the collapsed and the jittered set in one feature space."""
    ref = image_features(sets.reference, space)
    fid, kid = FeatureFID(ref), FeatureKID(ref)
    diverse, collapsed, jittered = (image_features(x, space) for x in (sets.diverse, sets.collapsed, sets.jittered))
    return CollapseRow(
        space=space, cls=sets.cls, n=sets.diverse.shape[0], distinct=sets.distinct,
        fid_diverse=fid(diverse), fid_collapsed=fid(collapsed), fid_jittered=fid(jittered),
        kid_diverse=kid(diverse), kid_collapsed=kid(collapsed), kid_jittered=kid(jittered),
    )


@dataclass(frozen=True)
class RankingRow:
    """FID of three sets of ``n`` digits against the held-out reference digits of class ``cls``."""

    space: str
    cls: int
    n: int
    distinct: int
    fid_diverse: float  # n distinct real digits of the class
    fid_collapsed: float  # ``distinct`` other real digits of the class, repeated to n rows
    fid_wrong_class: float  # n distinct real digits of class cls + 1

    @property
    def ranked(self) -> bool:
        """diverse < collapsed < wrong class: the order a judge of class-conditional samples must give."""
        return self.fid_diverse < self.fid_collapsed < self.fid_wrong_class

    def as_dict(self) -> dict:
        return {**asdict(self), "ranked": self.ranked}


def ranking_row(cls: int, space: str, n: int = 256, distinct: int = 8, seed: int = 0) -> RankingRow:
    """Does ``space`` rank a diverse set before a collapsed one before a wrong class? (needs the MNIST data)"""
    sets = collapse_sets(cls, n=n, distinct=distinct, seed=seed)
    wrong = collapse_sets((cls + 1) % 10, n=n, distinct=distinct, seed=seed).diverse
    fid = FeatureFID(image_features(sets.reference, space))
    return RankingRow(space=space, cls=cls, n=n, distinct=distinct,
                      fid_diverse=fid(image_features(sets.diverse, space)),
                      fid_collapsed=fid(image_features(sets.collapsed, space)),
                      fid_wrong_class=fid(image_features(wrong, space)))
