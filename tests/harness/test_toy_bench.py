"""`fvd toy`: a tiny run end to end, resume without recomputation, and the budget column."""

import json

from typer.testing import CliRunner

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.toy import run as toy
from fvdiffusion.bench.toy.config import DEFAULT_METHODS, SOLVER_METHODS, ToyBenchConfig, resolved
from fvdiffusion.bench.toy.report import budget_to_match, solver_table
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
    # the solver table (its own section: the per-problem table keeps its rows)
    main, solver = table.split("## A multistep solver at fewer steps")
    assert "dpmpp2m:" not in main and "| ddim:base |" not in main and "| ddim:fvd |" in main
    assert "| gmm2d-component | dpmpp2m:fvd-K20 | DPM-Solver++(2M), K = 20 | π* (target) |" in solver
    assert "| gmm2d-component | ddim:base | DDIM, K = 4 | p (data) |" in solver
    assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_rerun_skips_finished_cells(tmp_path, monkeypatch):
    cfg = ToyBenchConfig(problems=("gmm2d-component",), seeds=(1, 2), n_particles=16, num_steps=3, tune=False,
                         methods=TINY_METHODS[:2], solver_methods=())
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


# --- a multistep solver at fewer steps (issue 20 item 6) --------------------------------------

def test_solver_rows_run_with_their_own_steps_and_leave_the_main_keys_alone(tmp_path):
    import json as json_

    import fvdiffusion as fv

    cfg = ToyBenchConfig(problems=("gmm2d-component",), seeds=(1,), n_particles=16, num_steps=25, tune=False,
                         methods=(MethodSpec("fvd", "fvd"), SOLVER_METHODS[3]))
    assert [s.label for s in cfg.solver_only] == ["ddim:base", "ddim:base-K20", "dpmpp2m:base-K20", "ddim:fvd-K20",
                                                  "dpmpp2m:fvd-K20"]   # ddim:fvd is the main table's cell
    rows = {r["label"]: r for r in run_toy_bench(cfg, tmp_path, progress_bar=False)}
    assert rows["dpmpp2m:fvd-K20"]["denoiser_calls"] == rows["ddim:base-K20"]["denoiser_calls"] == 16 * 20
    assert rows["ddim:fvd"]["denoiser_calls"] == 16 * 25
    assert json_.loads(rows["dpmpp2m:base-K20"]["resolved"])["transition"] == "dpmpp_2m"
    assert "data_floor_ratio" in rows["ddim:base"] and "data_floor_ratio" not in rows["ddim:fvd"]
    # every main row keeps the key it had before rows could set their own steps
    for spec in DEFAULT_METHODS:
        before = fv.make_config(spec.method, n_particles=cfg.n_particles, num_steps=cfg.num_steps, seed=1,
                                **spec.options)
        assert resolved(spec, 1, cfg) == json_.dumps(before.as_dict(), sort_keys=True)


def test_solver_table_sets_each_row_against_its_methods_k_step_ddim_row():
    cfg = ToyBenchConfig(problems=("gmm2d-component",), seeds=(1, 2), tune=False)
    row = lambda label, calls, sw2=None, data=None: {"problem": "gmm2d-component", "label": label,
                                                     "denoiser_calls": calls, "sliced_w2": sw2, "floor_ratio": 1.0,
                                                     **({"data_sliced_w2": data, "data_floor_ratio": 1.0}
                                                        if data is not None else {})}
    rows = [row("ddim:base", 50_000, sw2=1.0, data=0.10), row("dpmpp2m:base-K20", 20_000, sw2=1.0, data=0.15),
            row("ddim:fvd", 50_000, sw2=0.20), row("dpmpp2m:fvd-K20", 20_000, sw2=0.10)]
    lines = {line.split(" | ")[1]: line for line in solver_table(rows, cfg).splitlines() if line.startswith("| gmm2d")}
    assert set(lines) == {"ddim:base", "dpmpp2m:base-K20", "ddim:fvd", "dpmpp2m:fvd-K20"}  # rows not run: left out
    base, fvd = lines["dpmpp2m:base-K20"], lines["dpmpp2m:fvd-K20"]
    assert "| p (data) | 0.150 ± 0.000 |" in base and "| +50% | 60% |" in base      # base: error to the data law
    assert "| π* (target) | 0.100 ± 0.000 |" in fvd and "| -50% | 60% |" in fvd   # fvd: error to the target
    assert "| +0% | 0% |" in lines["ddim:fvd"]
    no_reference = solver_table([r for r in rows if r["label"] != "ddim:fvd"], cfg)
    assert "| 20,000 | – | – |" in no_reference


def test_solver_rows_must_be_base_or_fvd():
    import pytest

    with pytest.raises(ValueError, match="solver_methods"):
        ToyBenchConfig(solver_methods=(MethodSpec("smc-K20", "smc", {"num_steps": 20}),))
