"""FID and KID of a pooled sample set for any resampling of its populations, from per-population sums.

A bootstrap draw of populations is a vector of counts c_p (how often population p is drawn);
the pooled set is c_p copies of every population. Both metrics depend on the pooled set only
through sums over populations, so each draw costs O(P·d²) instead of a feature pass:

* FID needs the pooled mean and covariance: n = Σ c_p n_p, Σx = Σ c_p s_p, Σxxᵀ = Σ c_p S_p;
  the Fréchet distance is torchmetrics' formula (unbiased covariances, tr √(Σ_ref Σ)), with
  tr √(Σ_ref Σ) taken as Σ √eig(A Σ A), A = Σ_ref^½ computed once (the same eigenvalues, but
  symmetric, hence batched and cheap). With all counts 1 it equals ``metrics.images.FeatureFID``
  on the concatenated features (a test checks it).
* KID is the unbiased squared MMD with the cubic kernel k(x, y) = (x·y/d + 1)³ on the whole
  pooled set (the quantity ``metrics.images.FeatureKID`` estimates with random subsets; equal
  to it when both sets have the subset size). The within-set term averages k over pairs of
  *different* samples; a draw that repeats a population would otherwise pair samples with
  their own copies and bias KID upward, so those pairs are left out. With block sums
  T_pq = Σ_{i∈p, j∈q} k(x_i, x_j) and D_p = Σ_{i∈p} k(x_i, x_i): the sum over such pairs is
  Σ_pq c_p c_q T_pq − Σ_p c_p² D_p, and their number n² − Σ_p c_p² n_p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 256  # bootstrap draws per batched eigendecomposition (bounds memory: CHUNK·d² floats)


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


@dataclass(frozen=True)
class Reference:
    """The real digits a sample set is scored against, as the sums both metrics need."""

    n: int
    mean: Tensor          # [d]
    cov: Tensor           # [d, d], unbiased
    cov_sqrt: Tensor      # Σ_ref^½
    features: Tensor      # [m, d] (the cross-kernel needs them)
    kernel_within: float  # mean of k(y_i, y_j) over i ≠ j

    @classmethod
    def from_features(cls, features: Tensor) -> "Reference":
        f = _float64(features, "reference features")
        n = f.shape[0]
        mean = f.mean(0)
        cov = (f - mean).T @ (f - mean) / (n - 1)
        k = _kernel(f, f)
        within = float((k.sum() - k.diagonal().sum()) / (n * (n - 1)))
        return cls(n=n, mean=mean, cov=cov, cov_sqrt=_psd_sqrt(cov), features=f, kernel_within=within)


@dataclass(frozen=True)
class GroupedSet:
    """Per-population sums of a sample set's features (P populations, d features)."""

    sizes: Tensor         # [P] samples per population
    sums: Tensor          # [P, d]
    outer: Tensor         # [P, d, d] Σ x xᵀ per population
    kernel_blocks: Tensor  # [P, P] T_pq
    self_kernel: Tensor   # [P] D_p = Σ_{i∈p} k(x_i, x_i) (the pairs of a sample with itself)
    cross: Tensor         # [P] Σ_{i∈p, j∈ref} k(x_i, y_j)

    @classmethod
    def from_populations(cls, populations: list[Tensor], reference: Reference) -> "GroupedSet":
        feats = [_float64(f, "population features") for f in populations]
        if not feats:
            raise ValueError("need at least one population")
        pooled = torch.cat(feats)
        sizes = torch.tensor([f.shape[0] for f in feats], dtype=torch.float64)
        owner = torch.repeat_interleave(torch.arange(len(feats)), sizes.long())
        one_hot = torch.nn.functional.one_hot(owner, len(feats)).double()  # [n, P]
        k = _kernel(pooled, pooled)
        return cls(
            sizes=sizes,
            sums=torch.stack([f.sum(0) for f in feats]),
            outer=torch.stack([f.T @ f for f in feats]),
            kernel_blocks=one_hot.T @ k @ one_hot,
            self_kernel=one_hot.T @ k.diagonal(),
            cross=one_hot.T @ _kernel(pooled, reference.features).sum(1),
        )

    @property
    def populations(self) -> int:
        return int(self.sizes.numel())

    def all_once(self) -> Tensor:
        """Counts [1, P] of the set itself (every population once)."""
        return torch.ones(1, self.populations, dtype=torch.int64)


def fid(grouped: GroupedSet, reference: Reference, counts: Tensor) -> Tensor:
    """FID [B] of the pooled sets given by ``counts`` [B, P] against the reference."""
    c = counts.double()
    n = c @ grouped.sizes                                  # [B]
    mean = (c @ grouped.sums) / n[:, None]                 # [B, d]
    out = [torch.zeros(0, dtype=torch.float64)]  # no draws: no replicates
    for lo in range(0, c.shape[0], CHUNK):
        sl = slice(lo, lo + CHUNK)
        second = torch.einsum("bp,pij->bij", c[sl], grouped.outer)
        cov = (second - n[sl, None, None] * mean[sl, :, None] * mean[sl, None, :]) / (n[sl, None, None] - 1)
        a = reference.cov_sqrt
        root_trace = torch.linalg.eigvalsh(a @ cov @ a).clamp_min(0).sqrt().sum(-1)
        dist = (mean[sl] - reference.mean).square().sum(-1)
        out.append(dist + reference.cov.trace() + cov.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * root_trace)
    return torch.cat(out)


def kid(grouped: GroupedSet, reference: Reference, counts: Tensor) -> Tensor:
    """KID [B] (unbiased MMD², cubic kernel) of the pooled sets given by ``counts`` [B, P]."""
    c = counts.double()
    n = c @ grouped.sizes
    pair_sum = torch.einsum("bp,pq,bq->b", c, grouped.kernel_blocks, c) - c.square() @ grouped.self_kernel
    within = pair_sum / (n.square() - c.square() @ grouped.sizes)
    cross = (c @ grouped.cross) / (n * reference.n)
    return within + reference.kernel_within - 2 * cross


def _float64(features: Tensor, name: str) -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"{name} must be a 2-D tensor [n, d] with n >= 1, got {getattr(features, 'shape', type(features))}")
    out = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contain NaN or inf")
    return out
