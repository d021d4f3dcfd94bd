"""scripts/engine_bench.py at a tiny size: the toy rows, resuming, the report, and the sync counting.

No wall-clock thresholds: only that every time is finite and positive and the rows are complete.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "engine_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("engine_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_bench"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("engine_bench", None)


ENV = {"cpu": "test", "cpu_count": 1, "torch": torch.__version__, "threads": 1, "python": "3", "fvdiffusion": "src",
       "git": "test"}


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_toy_overhead_rows_resume_and_report(bench, tmp_path):
    cfg = bench.BenchConfig(toy_particles=(16,), toy_steps=2, repeats=1, parts=("overhead",))
    log = bench.RecordLog(tmp_path / bench.RESULTS, bench.KEY_FIELDS)
    rows = bench.run_overhead(cfg, log, ENV, say=lambda _: None)

    assert sorted(r["method"] for r in rows) == sorted(bench.TOY_METHODS)
    for row in rows:
        for name in (*bench.KEY_FIELDS, "seed", "wall_seconds", "seconds_per_particle_step", "model_seconds",
                     "engine_seconds_per_particle_step", "denoiser_rows", "reward_rows", "git", "torch"):
            assert name in row, (name, row)
        assert row["part"] == "overhead" and row["n_particles"] == 16 and row["num_steps"] == 2
        assert _positive(row["wall_seconds"]) and _positive(row["seconds_per_particle_step"]), row
        assert _positive(row["model_seconds"]) and row["model_seconds"] < row["wall_seconds"], row
        assert math.isfinite(row["engine_seconds_per_particle_step"]), row
        assert row["seconds_per_particle_step"] == pytest.approx(row["wall_seconds"] / (16 * 2))
        assert row["denoiser_rows"] >= 16 * 2  # every particle denoised at every step
        if row["denoiser_calls"] is not None:
            assert row["denoiser_rows"] == row["denoiser_calls"]

    # resumable: the rows are on disk, a rerun measures nothing
    again = bench.RecordLog(tmp_path / bench.RESULTS, bench.KEY_FIELDS)
    assert len(again.rows) == 3 and bench.run_overhead(cfg, again, ENV, say=lambda _: None) == []

    md, figure = bench.write_report(tmp_path, cfg, "python scripts/engine_bench.py --tiny", ENV)
    text = md.read_text()
    assert "    python scripts/engine_bench.py --tiny" in text and "\n| 16 | " in text
    assert figure is not None and figure.stat().st_size > 0


def test_cheap_toy_models_are_the_exact_ones(bench):
    from fvdiffusion.testbeds import toy_problem

    problem = toy_problem("gmm2d-component")
    schedule = bench.VPSchedule.linear(1000)
    exact, cheap = problem.denoiser(schedule), bench.CheapMixtureDenoiser(problem.mixture, schedule)
    x = 1.5 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999, 400, 0, -1):
        steps = torch.full((32,), t)
        torch.testing.assert_close(cheap(x, steps), exact(x, steps), rtol=1e-10, atol=1e-10)
    reward = bench.CheapComponentReward(problem.mixture, problem.target_component)
    torch.testing.assert_close(reward(x), problem.reward(x), rtol=1e-10, atol=1e-10)


def test_sync_ops_are_counted_per_step(bench):
    cfg = bench.BenchConfig()
    denoiser, reward, lam = bench.toy_models(cfg)
    summary = bench.profile_run("fvd", denoiser, reward, 16, 2, 0, "cpu", lam=lam)
    assert summary["denoiser_calls_profiled"] == 2
    assert summary["categories"][-1] == bench.OUTERMOST
    for name in summary["categories"]:
        assert len(summary["engine_counts"][name]) == 3  # setup, step 1, step 2 to the end
        assert summary["denoiser_counts"][name] == 0  # the cheap denoiser never syncs
    assert _positive(summary["profiled_wall_seconds"]) and summary["top_ops"] and summary["top_engine_ops"]
    row = {**bench._key(cfg, "profile", cfg.mnist_problem, cfg.profile_particles, cfg.profile_steps, "fvd", 0),
           **summary}
    text = bench.report([row], cfg, "cmd", ENV, None)
    assert "## c. Host synchronisations" in text and bench.OUTERMOST in text
