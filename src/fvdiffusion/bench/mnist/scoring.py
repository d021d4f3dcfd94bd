"""Score cells: FID and KID in every feature space with bootstrap replicates over populations,
and eval-net accuracy.

Each sample's features are computed once per space; the bootstrap then only re-weights
per-population sums (``bench.common.grouped_metrics``). The FID point estimate is torchmetrics'
(``metrics.images.FeatureFID`` on the pooled features); the grouped formula must reproduce it,
which guards the replicates. The bootstrap counts of a cell depend only on (class, seed, number
of populations), so two methods of the same (class, seed) are resampled with the same
population indices: population p of every method starts from the same noise, and the paired
comparison keeps that pairing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fvdiffusion.bench.common.grouped_metrics import GroupedSet, Reference, fid, kid
from fvdiffusion.bench.common.paired_stats import resample_counts
from fvdiffusion.bench.mnist.cells import has_images, population_images
from fvdiffusion.bench.mnist.config import MnistBenchConfig

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


def _pack(values: Tensor) -> str:
    """Bootstrap replicates as base64 float32 (a fifth of their JSON text; rounding far below the spread)."""
    return base64.b64encode(values.to(torch.float32).numpy().tobytes()).decode("ascii")


def _unpack(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()).double()


def score_record(score: CellScore, n_boot: int) -> dict[str, Any]:
    """What a results.jsonl row keeps of its score, so that a report needs no images."""
    return {"bootstrap": n_boot, "populations": score.populations, "accuracy": score.accuracy,
            "spaces": {space: {"fid": score.fid[space], "kid": score.kid[space],
                               "fid_replicates": _pack(score.fid_replicates[space]),
                               "kid_replicates": _pack(score.kid_replicates[space])} for space in score.fid}}


def score_from_record(record: dict[str, Any], spaces: tuple[str, ...], n_boot: int) -> CellScore:
    """The stored score of a row, if it has every space asked for and as many bootstrap draws (else ValueError)."""
    missing = [s for s in spaces if s not in record["spaces"]]
    if missing or (n_boot and record["bootstrap"] != n_boot):
        raise ValueError(f"a row without images stores scores for spaces {sorted(record['spaces'])} with "
                         f"{record['bootstrap']} bootstrap draws; asked for {list(spaces)} with {n_boot}: rerun with "
                         "those, or recompute the cell with images")
    stored = {s: record["spaces"][s] for s in spaces}
    return CellScore(populations=record["populations"], accuracy=record["accuracy"],
                     fid={s: v["fid"] for s, v in stored.items()}, kid={s: v["kid"] for s, v in stored.items()},
                     fid_replicates={s: _unpack(v["fid_replicates"]) if n_boot else torch.zeros(0)
                                     for s, v in stored.items()},
                     kid_replicates={s: _unpack(v["kid_replicates"]) if n_boot else torch.zeros(0)
                                     for s, v in stored.items()})


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
        self._points: dict[tuple, CellScore] = {}
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
        from fvdiffusion.errors import WeightsMissingError

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
        if key in self._cache:
            return self._cache[key]
        if key not in self._points:
            self._points[key] = self._score(row, 0)
        return self._points[key]

    def record(self, row: dict[str, Any], tuning: bool) -> dict[str, Any]:
        """The score to store in a freshly computed row (points only for a tuning cell)."""
        n_boot = 0 if tuning else self.cfg.bootstrap
        return score_record(self.points(row) if tuning else self.score(row), n_boot)

    def _score(self, row: dict[str, Any], n_boot: int) -> CellScore:
        if not has_images(row):
            if "scores" not in row:
                raise ValueError(f"row {row['label']} class {row['class']} seed {row['seed']} has neither images nor scores")
            return score_from_record(row["scores"], self.spaces, n_boot)
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
