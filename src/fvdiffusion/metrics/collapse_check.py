"""Does a feature space see collapse? A few real digits repeated vs a diverse real set.

For each class: ``n`` distinct train digits (the diverse set) and ``distinct`` other train
digits repeated to ``n`` rows (the collapsed set, what a sampler whose population fell onto
a few lineages returns), both with the same tiny pixel noise so neither set is exactly
degenerate, scored by FID and KID against the held-out reference digits of the class. A
feature space fit for judging samplers must give the collapsed set a far worse score.
Used by tests/test_feature_space.py and scripts/feature_space_table.py.
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


@dataclass(frozen=True)
class CollapseRow:
    space: str
    cls: int
    n: int
    distinct: int
    fid_diverse: float
    fid_collapsed: float
    kid_diverse: float
    kid_collapsed: float

    @property
    def fid_ratio(self) -> float:
        return self.fid_collapsed / self.fid_diverse

    def as_dict(self) -> dict:
        return {**asdict(self), "fid_ratio": self.fid_ratio}


def collapse_sets(cls: int, n: int = 200, distinct: int = 4, noise: float = 0.01, seed: int = 0) -> CollapseSets:
    """The reference, diverse and collapsed sets of class ``cls`` (disjoint digits; needs the MNIST data)."""
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
    return CollapseSets(
        cls=cls, distinct=distinct, reference=reference.images[reference.labels == cls],
        diverse=(diverse + noise_pair[0]).clamp(-1, 1), collapsed=(collapsed + noise_pair[1]).clamp(-1, 1),
    )


def collapse_row(sets: CollapseSets, space: str) -> CollapseRow:
    """FID and KID of the diverse and the collapsed set in one feature space."""
    ref = image_features(sets.reference, space)
    fid, kid = FeatureFID(ref), FeatureKID(ref)
    diverse, collapsed = image_features(sets.diverse, space), image_features(sets.collapsed, space)
    return CollapseRow(
        space=space, cls=sets.cls, n=sets.diverse.shape[0], distinct=sets.distinct,
        fid_diverse=fid(diverse), fid_collapsed=fid(collapsed), kid_diverse=kid(diverse), kid_collapsed=kid(collapsed),
    )
