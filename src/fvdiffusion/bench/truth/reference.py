"""The resumable base-sample job behind the SNIS reference (the "sampler floor").

Shard i of a sampler type is one call ``fvdiffusion.sample("base", ...)`` of ``shard_n(i)``
samples with seed ``SHARD_SEED_OFFSET + i`` and the sampler's η; only the statistic vector of
each final x0 is kept. Each finished shard is one fsynced JSON line of ``base_<sampler>.jsonl``
(:class:`fvdiffusion.durable.RecordLog`), keyed by everything that defines it (testbed,
sampler, K, shard size, index, size, statistic names), so a killed job resumes at the first
missing shard and a larger ``base_samples`` later reuses every shard already drawn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.bench.truth.config import SHARD_SEED_OFFSET, ReferenceConfig
from fvdiffusion.bench.truth.testbed import TruthTestbed
from fvdiffusion.durable import RecordLog, read_records

KEY_FIELDS = ("testbed", "sampler", "steps", "shard_size", "shard", "n", "statistics")
DIGITS = 8  # significant digits stored per value (float32 sampling carries about 7)


def base_path(out_dir: Path, sampler: str) -> Path:
    return Path(out_dir) / f"base_{sampler}.jsonl"


def shard_key(testbed: TruthTestbed, cfg: ReferenceConfig, index: int) -> dict[str, Any]:
    return {"testbed": testbed.name, "sampler": cfg.sampler, "steps": cfg.steps, "shard_size": cfg.shard_size,
            "shard": index, "n": cfg.shard_n(index), "statistics": list(testbed.names)}


def run_shard(testbed: TruthTestbed, cfg: ReferenceConfig, index: int) -> dict[str, Any]:
    """Draw shard ``index`` and return its row: the statistics of every sample, column by column."""
    import fvdiffusion as fv

    seed = SHARD_SEED_OFFSET + index
    start = time.perf_counter()
    result = fv.sample("base", testbed.denoiser, None, n_particles=cfg.shard_n(index), num_steps=cfg.steps,
                       eta=cfg.eta, seed=seed)
    stats = testbed.statistics(result.samples)
    wall = time.perf_counter() - start
    return {**shard_key(testbed, cfg, index), "seed": seed, "eta": cfg.eta,
            "values": {name: [float(f"{v:.{DIGITS}g}") for v in stats[:, j].tolist()]
                       for j, name in enumerate(testbed.names)},
            "wall_seconds": wall, "denoiser_calls": result.cost.denoiser_calls, "torch": torch.__version__,
            "device": str(result.samples.device)}


@dataclass(frozen=True, eq=False)
class BaseSample:
    """The statistics of the base samples drawn so far for one sampler type, shards in order."""

    names: tuple[str, ...]
    stats: Tensor        # [n, S] float64
    shards_done: int
    shards_total: int
    wall_seconds: float

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total


def load_base(testbed: TruthTestbed, cfg: ReferenceConfig, out_dir: Path) -> BaseSample:
    """The shards of ``cfg`` found in ``base_<sampler>.jsonl`` (none: an empty sample).

    Read-only: a job may be appending to the file right now, so a torn last line is skipped here,
    never cut off (only the writer's :class:`RecordLog` repairs the file)."""
    records, _ = read_records(base_path(out_dir, cfg.sampler))
    wanted = {_key(shard_key(testbed, cfg, i)): i for i in range(cfg.n_shards)}
    found: dict[int, dict[str, Any]] = {}
    for row in records:
        index = wanted.get(_key(row))
        if index is not None:
            found[index] = row  # the latest row of a shard wins, as in RecordLog.find
    return _assemble(testbed, cfg, [found[i] for i in sorted(found)])


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row.get(field) for field in KEY_FIELDS], sort_keys=True)


def _assemble(testbed: TruthTestbed, cfg: ReferenceConfig, rows: list[dict[str, Any]]) -> BaseSample:
    columns = [torch.tensor([v for row in rows for v in row["values"][name]], dtype=torch.float64)
               for name in testbed.names]
    stats = torch.stack(columns, 1) if rows else torch.zeros(0, len(testbed.names), dtype=torch.float64)
    return BaseSample(testbed.names, stats, len(rows), cfg.n_shards, sum(row["wall_seconds"] for row in rows))


def run_reference(testbed: TruthTestbed, cfg: ReferenceConfig, out_dir: Path, progress_bar: bool = True) -> BaseSample:
    """Draw every missing shard (each appended and fsynced as it finishes); returns the whole base sample."""
    from tqdm.auto import tqdm

    log = RecordLog(base_path(out_dir, cfg.sampler), KEY_FIELDS)
    missing = [i for i in range(cfg.n_shards) if not log.done(**shard_key(testbed, cfg, i))]
    with tqdm(total=cfg.n_shards, initial=cfg.n_shards - len(missing), desc=f"base samples ({cfg.sampler})",
              unit="shard", disable=not progress_bar, dynamic_ncols=True) as bar:
        for index in missing:
            log.append(run_shard(testbed, cfg, index))
            bar.update(1)
    return load_base(testbed, cfg, out_dir)
