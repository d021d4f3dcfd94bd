"""Image-set metrics on feature matrices: FID, KID, diversity, accuracy.

The features come from ``metrics.feature_spaces`` (the evaluation network, or the feature
autoencoder that sees within-class variety).

FID is torchmetrics' ``FrechetInceptionDistance`` with a pass-through feature extractor, fed
precomputed features: the features are computed once per sample set
and shared by FID and the diversity metrics, and the Fréchet distance itself (float64 moment
sums, eigenvalues of Σ_ref·Σ) is torchmetrics' well-tested code. Everything after the
feature pass runs on the CPU in float64, so a number does not depend on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

METRICS_EXTRA_HINT = "install the metrics extra from the fvdiffusion clone: pip install -e '.[metrics]'"


def _feature_matrix(features: Tensor, name: str, min_rows: int = 1) -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n, d], got {getattr(features, 'shape', type(features))}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {features.shape[0]}")
    out = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return out


class _PassThrough(nn.Module):
    """A 'feature extractor' whose inputs already are the features (torchmetrics reads num_features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


class FeatureFID:
    """FID of sample sets against one fixed reference set, all given as feature matrices [n, d].

    The reference moments are accumulated once; each call scores one sample set.
    """

    def __init__(self, reference_features: Tensor) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"FID needs torchmetrics ({METRICS_EXTRA_HINT})") from err
        ref = _feature_matrix(reference_features, "reference_features", min_rows=2)
        self.dim = ref.shape[1]
        self._metric = FrechetInceptionDistance(feature=_PassThrough(self.dim), reset_real_features=False)
        self._metric.update(ref, real=True)

    def __call__(self, features: Tensor) -> float:
        fake = _feature_matrix(features, "features", min_rows=2)
        if fake.shape[1] != self.dim:
            raise ValueError(f"features have dimension {fake.shape[1]}, the reference has {self.dim}")
        self._metric.reset()  # keeps the reference moments (reset_real_features=False)
        self._metric.update(fake, real=False)
        return float(self._metric.compute())


@dataclass(frozen=True)
class KIDScore:
    """Kernel Inception Distance: mean and spread of the unbiased MMD² over random subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


class FeatureKID:
    """KID of sample sets against one fixed reference set, all given as feature matrices [n, d].

    KID is the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³,
    averaged over ``num_subsets`` random subsets of ``subset_size`` rows drawn from each set
    (Bińkowski et al., 2018). Unlike FID it has no bias that grows with d / n, so it stays
    meaningful for the benchmark's small per-class sets. The subset size shrinks to the
    smaller set when a set has fewer rows; the draws come from a generator seeded with
    ``seed`` on every call, so a score depends only on its inputs.
    """

    def __init__(self, reference_features: Tensor, subset_size: int = 1000, num_subsets: int = 100,
                 seed: int = 0) -> None:
        for name, value, least in (("subset_size", subset_size, 2), ("num_subsets", num_subsets, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self._ref = _feature_matrix(reference_features, "reference_features", min_rows=2)
        self.dim = self._ref.shape[1]
        self.subset_size, self.num_subsets, self.seed = subset_size, num_subsets, seed
        self._k_ref = self._kernel(self._ref, self._ref)

    def _kernel(self, a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T / self.dim + 1.0) ** 3

    def score(self, features: Tensor) -> KIDScore:
        fake = _feature_matrix(features, "features", min_rows=2)
        if fake.shape[1] != self.dim:
            raise ValueError(f"features have dimension {fake.shape[1]}, the reference has {self.dim}")
        # the full kernel matrices once; each subset is a gather from them
        k_fake, k_cross = self._kernel(fake, fake), self._kernel(self._ref, fake)
        m = min(self.subset_size, self._ref.shape[0], fake.shape[0])
        generator = torch.Generator().manual_seed(self.seed)
        values = []
        for _ in range(self.num_subsets):
            r = torch.randperm(self._ref.shape[0], generator=generator)[:m]
            f = torch.randperm(fake.shape[0], generator=generator)[:m]
            values.append(_unbiased_mmd2(self._k_ref[r][:, r], k_fake[f][:, f], k_cross[r][:, f]))
        scores = torch.tensor(values, dtype=torch.float64)
        std = float(scores.std(unbiased=False)) if len(values) > 1 else 0.0
        return KIDScore(mean=float(scores.mean()), std=std, subset_size=m, num_subsets=self.num_subsets)

    def __call__(self, features: Tensor) -> float:
        """The mean KID (use :meth:`score` for its spread over subsets)."""
        return self.score(features).mean


def _unbiased_mmd2(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(reference_features: Tensor, features: Tensor) -> float:
    """Mean KID between two feature sets (about 0 for sets from one distribution)."""
    return FeatureKID(reference_features)(features)


def fid(reference_features: Tensor, features: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (0 for identical sets)."""
    return FeatureFID(reference_features)(features)


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of rows."""
    f = _feature_matrix(features, "features", min_rows=2)
    return float(torch.pdist(f).mean())


def vendi_score(features: Tensor) -> float:
    """Vendi score with the cosine-similarity kernel: exp of the entropy of the eigenvalues of K/n.

    It is the effective number of distinct samples: 1 when every row points the same way,
    n when all rows are mutually orthogonal. A zero row has no direction and counts as
    orthogonal to everything (its kernel row is e_i).
    """
    f = _feature_matrix(features, "features")
    norms = f.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, f / norms.clamp_min(1e-300), torch.zeros_like(f))
    kernel = unit @ unit.T
    kernel.fill_diagonal_(1.0)
    eig = torch.linalg.eigvalsh(kernel / f.shape[0]).clamp_min(0.0)
    eig = eig[eig > 0]
    eig = eig / eig.sum()  # removes the rounding error of the clamp; the trace of K/n is 1
    return float(torch.exp(-(eig * eig.log()).sum()))


def accuracy(logits: Tensor, target_class: int) -> float:
    """Fraction of rows whose argmax is ``target_class``."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [n, classes] with n >= 1, got shape {tuple(logits.shape)}")
    if isinstance(target_class, bool) or not isinstance(target_class, int) or not 0 <= target_class < logits.shape[1]:
        raise ValueError(f"target_class must be an int in 0..{logits.shape[1] - 1}, got {target_class!r}")
    return float((logits.argmax(dim=1) == target_class).double().mean())


@torch.no_grad()
def features_and_logits(eval_net: nn.Module, images: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The evaluation network's features [n, d] and logits [n, classes] on the CPU, float64.

    Images are clamped to the data range [-1, 1] first (samples can overshoot it slightly and
    the network only saw real digits); they run on the network's device in micro-batches.
    """
    device = next(eval_net.parameters()).device
    step = batch_size or images.shape[0]
    feats, logits = [], []
    for start in range(0, images.shape[0], step):
        chunk = images[start: start + step].to(device, torch.float32).clamp(-1, 1)
        f = eval_net.features(chunk)
        feats.append(f.to("cpu", torch.float64))
        logits.append(eval_net.fc(f).to("cpu", torch.float64))
    return torch.cat(feats), torch.cat(logits)


@dataclass(frozen=True)
class ImageSetMetrics:
    fid: float
    accuracy: float
    pairwise_distance: float
    vendi: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_set_metrics(features: Tensor, logits: Tensor, target_class: int, reference: FeatureFID) -> ImageSetMetrics:
    """Every per-set metric of the MNIST benchmark from one feature pass."""
    values = ImageSetMetrics(
        fid=reference(features), accuracy=accuracy(logits, target_class),
        pairwise_distance=mean_pairwise_distance(features), vendi=vendi_score(features),
    )
    if not all(math.isfinite(v) for v in values.as_dict().values()):
        raise ValueError(f"non-finite image metric: {values}")
    return values
