"""The tuning protocol every benchmark follows: settings are chosen on one seed that is never reported."""

from __future__ import annotations

from typing import Collection

TUNING_SEED = 0


def check_reported_seeds(seeds: Collection[int]) -> None:
    """Refuse a reported seed list that contains the tuning seed (tuning must not see reported runs)."""
    if TUNING_SEED in seeds:
        raise ValueError(f"seeds must not contain the tuning seed {TUNING_SEED}: got {seeds}")
