"""Score cells: FID and KID in every feature space with bootstrap replicates over populations,
and eval-net accuracy.

Each sample's features are computed once per space; the bootstrap then only re-weights
per-population sums (``bench.grouped_metrics``). The FID point estimate is torchmetrics'
(``metrics.images.FeatureFID`` on the pooled features); the grouped formula must reproduce it,
which guards the replicates. The bootstrap counts of a cell depend only on (class, seed, number
of populations), so two methods of the same (class, seed) are resampled with the same
population indices: population p of every method starts from the same noise, and the paired
comparison keeps that pairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.bench.grouped_metrics import GroupedSet, Reference, fid, kid
from fvdiffusion.bench.mnist.cells import population_images
from fvdiffusion.bench.mnist.config import MnistBenchConfig
from fvdiffusion.bench.paired_stats import resample_counts

# the space single-number summaries (figures, tuning ties, value-based table) lead with: the
# autoencoder sees within-class collapse, the eval net does not (metrics/feature_spaces.py)
PREFERRED_PRIMARY = "ae"
FID_CHECK_RTOL, FID_CHECK_ATOL = 1e-4, 1e-3   # loose: torchmetrics takes √ of near-zero complex eigenvalues


@dataclass(frozen=True)
class CellScore:
    """A cell's metrics per feature space: points and bootstrap replicates [B] over its populations."""

    populations: int
    fid: dict[str, float]
    kid: dict[str, float]
    fid_replicates: dict[str, Tensor]
    kid_replicates: dict[str, Tensor]
    accuracy: float


def bootstrap_counts(cls: int, seed: int, n_populations: int, n_boot: int) -> Tensor:
    """The same draws for every method of a (class, seed) with this many populations: paired resampling."""
    generator = torch.Generator().manual_seed((seed * 100 + cls) * 10_000 + n_populations)
    return resample_counts(n_populations, n_boot, generator)


class Scorer:
    """Feature spaces, per-class references and the eval net, loaded once; scores cached per cell."""

    def __init__(self, cfg: MnistBenchConfig) -> None:
        from fvdiffusion.metrics.feature_spaces import FEATURE_SPACES
        from fvdiffusion.zoo.mnist_data import load_mnist

        self.cfg = cfg
        self.device = cfg.device
        self.batch_size = cfg.batch_size or 256
        self._reference_split = load_mnist("reference")
        self._references: dict[tuple[str, int], Reference] = {}
        self._fid_checks: dict[tuple[str, int], Any] = {}
        self._cache: dict[tuple, CellScore] = {}
        self._eval_net = None
        self.unavailable: dict[str, str] = {}
        requested = cfg.feature_spaces or tuple(FEATURE_SPACES)
        self.spaces = tuple(s for s in requested if self._available(s, explicit=cfg.feature_spaces is not None))
        if not self.spaces:
            raise ValueError(f"no feature space is available: {self.unavailable}")

    @property
    def primary(self) -> str:
        return PREFERRED_PRIMARY if PREFERRED_PRIMARY in self.spaces else self.spaces[0]

    def _available(self, space: str, explicit: bool) -> bool:
        """A space whose network is not installed is skipped (and named in the report) unless asked for."""
        from fvdiffusion.zoo.loaders import WeightsMissingError

        try:
            self.reference(space, self.cfg.classes[0])
        except WeightsMissingError as err:
            if explicit:
                raise
            self.unavailable[space] = str(err)
            return False
        return True

    def features(self, images: Tensor, space: str) -> Tensor:
        from fvdiffusion.metrics.feature_spaces import image_features

        return image_features(images, space, device=self.device, batch_size=self.batch_size)

    def reference(self, space: str, cls: int) -> Reference:
        if (space, cls) not in self._references:
            from fvdiffusion.metrics.images import FeatureFID

            split = self._reference_split
            feats = self.features(split.images[split.labels == cls], space)
            self._references[(space, cls)] = Reference.from_features(feats)
            self._fid_checks[(space, cls)] = FeatureFID(feats)
        return self._references[(space, cls)]

    def accuracy(self, images: Tensor, cls: int) -> float:
        from fvdiffusion.metrics.images import accuracy, features_and_logits
        from fvdiffusion.zoo.loaders import load_eval_net

        if self._eval_net is None:
            self._eval_net = load_eval_net(device=self.device)
        return accuracy(features_and_logits(self._eval_net, images, self.batch_size)[1], cls)

    def score(self, row: dict[str, Any]) -> CellScore:
        """Points and bootstrap replicates of a reported cell."""
        key = (row["class"], row["seed"], row["resolved"])
        if key not in self._cache:
            self._cache[key] = self._score(row, self.cfg.bootstrap)
        return self._cache[key]

    def points(self, row: dict[str, Any]) -> CellScore:
        """Points only (tuning needs no interval); replicates are empty."""
        key = (row["class"], row["seed"], row["resolved"])
        return self._cache[key] if key in self._cache else self._score(row, 0)

    def _score(self, row: dict[str, Any], n_boot: int) -> CellScore:
        cls, images = row["class"], population_images(row)
        counts = (bootstrap_counts(cls, row["seed"], len(images), n_boot) if n_boot
                  else torch.zeros(0, len(images), dtype=torch.int64))
        out: dict[str, dict[str, Any]] = {"fid": {}, "kid": {}, "fid_replicates": {}, "kid_replicates": {}}
        pooled = torch.cat(images)
        for space in self.spaces:
            reference = self.reference(space, cls)
            feats = self.features(pooled, space)
            grouped = GroupedSet.from_populations(list(feats.split([x.shape[0] for x in images])), reference)
            point = self._fid_checks[(space, cls)](feats)
            own = float(fid(grouped, reference, grouped.all_once())[0])
            if abs(own - point) > FID_CHECK_ATOL + FID_CHECK_RTOL * abs(point):
                raise RuntimeError(f"grouped FID {own} disagrees with torchmetrics' {point} ({space}, class {cls})")
            out["fid"][space] = point
            out["kid"][space] = float(kid(grouped, reference, grouped.all_once())[0])
            out["fid_replicates"][space] = fid(grouped, reference, counts)
            out["kid_replicates"][space] = kid(grouped, reference, counts)
        return CellScore(populations=len(images), accuracy=self.accuracy(pooled, cls), **out)
