"""`fvd toy`: a tiny run end to end, resume without recomputation, and the budget column."""

import json

from typer.testing import CliRunner

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.toy import run as toy
from fvdiffusion.bench.toy.config import ToyBenchConfig
from fvdiffusion.bench.toy.report import budget_to_match
from fvdiffusion.bench.toy.run import run_toy_bench
from fvdiffusion.cli import app

TINY_METHODS = (MethodSpec("smc-multinomial", "smc"), MethodSpec("fvd", "fvd"),
                MethodSpec("svdd-M2", "svdd", {"n_candidates": 2}))


def test_toy_command_writes_table_and_figure(tmp_path):
    # every default method and the value-based sweeps, at a tiny size
    result = CliRunner().invoke(app, ["toy", "--out", str(tmp_path), "--problem", "gmm2d-component", "--seed", "1",
                                      "--particles", "32", "--steps", "4", "--no-tune"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    assert "| fvd |" in table and "| smc-multinomial |" in table and "| dts-R256 |" in table
    assert "denoiser calls to reach FVD's SW2" in table
    assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_rerun_skips_finished_cells(tmp_path, monkeypatch):
    cfg = ToyBenchConfig(problems=("gmm2d-component",), seeds=(1, 2), n_particles=16, num_steps=3, tune=False,
                         methods=TINY_METHODS[:2])
    calls = []
    real = toy.run_cell
    monkeypatch.setattr(toy, "run_cell", lambda *a, **k: calls.append(a[1].label) or real(*a, **k))
    first = run_toy_bench(cfg, tmp_path, progress_bar=False)
    assert len(calls) == 4
    # simulate an interruption: drop the last finished cell and leave a half-written line
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    calls.clear()
    second = run_toy_bench(cfg, tmp_path, progress_bar=False)
    assert calls == ["fvd"]  # only the lost cell is recomputed
    assert [r["sliced_w2"] for r in first] == [r["sliced_w2"] for r in second]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4


def test_seed_zero_is_reserved_for_tuning():
    import pytest

    with pytest.raises(ValueError, match="tuning seed"):
        ToyBenchConfig(seeds=(0, 1))


def test_budget_to_match_picks_the_smallest_sufficient_budget():
    rows = [
        {"problem": "p", "label": "fvd", "sliced_w2": 0.10, "denoiser_calls": 1000, "wall_seconds": 1.0},
        {"problem": "p", "label": "svdd-M2", "sliced_w2": 0.30, "denoiser_calls": 2000, "wall_seconds": 2.0},
        {"problem": "p", "label": "svdd-M4", "sliced_w2": 0.09, "denoiser_calls": 4000, "wall_seconds": 3.0},
        {"problem": "p", "label": "svdd-M8", "sliced_w2": 0.05, "denoiser_calls": 8000, "wall_seconds": 6.0},
    ]
    row = budget_to_match(rows, "p", "svdd")
    assert row[1].startswith("4,000") and row[2] == "4.0×" and row[4] == "3.0×"
    rows[2]["sliced_w2"] = rows[3]["sliced_w2"] = 0.2
    assert budget_to_match(rows, "p", "svdd")[1].startswith("not reached")
