"""``fvd bench scaling`` end to end on the quick grid (real gloo groups of 1 and 2 processes).

One quick run (about 20 s on 2 cores) is shared by the module; everything else reads its files.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from fvdiffusion.bench.scaling import Progress, ScalingConfig, mismatches, run_scaling, summarise
from fvdiffusion.cli import app

runner = CliRunner()
QUICK_ROWS = 2 * 2 + 1 * 2  # toy N 16, 64 and MNIST N 16, each on 1 and 2 processes, 1 repeat


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "out"
    result = runner.invoke(app, ["bench", "scaling", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_the_quick_grid_writes_one_row_per_run_a_report_and_a_figure(quick):
    rows = _rows(quick)
    assert len(rows) == QUICK_ROWS
    assert {(r["testbed"], r["n"], r["procs"]) for r in rows} == {
        ("toy", 16, 1), ("toy", 16, 2), ("toy", 64, 1), ("toy", 64, 2), ("mnist", 16, 1), ("mnist", 16, 2)}
    for row in rows:
        assert row["world_size"] == row["procs"] and row["noise_chunk"] == row["n"] // 4
        assert row["step_seconds"] == pytest.approx(row["wall_seconds"] / row["steps"]) and row["step_seconds"] > 0
        assert row["particle_bytes"] == (28 * 28 * 4 if row["testbed"] == "mnist" else 2 * 4)
    report = (quick / "results.md").read_text()
    assert "fvd bench scaling" in report.splitlines()[3] and "--quick" in report.splitlines()[3]
    assert "torch thread(s) per process" in report and "## toy" in report and "## mnist" in report
    assert "## Findings" in report
    png = (quick / "scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(quick / "scaling.png") as image:
        image.verify()


def test_a_rerun_skips_every_run_already_recorded(quick):
    before = (quick / "results.jsonl").read_bytes()
    started: list[int] = []
    cfg = ScalingConfig(quick=True, repeats=1)
    rows = run_scaling(cfg, quick, progress=Progress(start=started.append))
    assert started == [0]  # nothing left to run: no group was launched
    assert (quick / "results.jsonl").read_bytes() == before
    assert len(rows) == QUICK_ROWS
    result = runner.invoke(app, ["bench", "scaling", "--quick", "--out", str(quick), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (quick / "results.jsonl").read_bytes() == before


def test_bytes_per_selection_stay_within_the_bound_and_some_cross_ranks(quick):
    rows = _rows(quick)
    for row in rows:
        assert row["selections"] == row["selected_steps"] > 0
        assert row["bytes_per_selection"] == pytest.approx(row["particle_bytes_moved"] / row["selections"])
        assert row["bound_per_selection"] == pytest.approx(
            2 * row["mean_dead_fraction"] * row["n"] * row["particle_bytes"])
        assert row["bound_ratio"] <= 1.0
        assert row["scalar_bytes_per_selection"] == pytest.approx(row["scalar_bytes_gathered"] / row["selections"])
        if row["procs"] == 1:
            assert row["particle_bytes_moved"] == 0
    assert any(row["particle_bytes_moved"] > 0 for row in rows if row["procs"] == 2)


def test_one_and_two_processes_ran_the_same_computation(quick):
    assert mismatches(_rows(quick)) == []
    assert "Same computation on every P" in (quick / "results.md").read_text()
    planted = [{"testbed": "toy", "n": 16, "repeat": 0, "mean_dead_fraction": d, "selected_steps": 2} for d in (0.1, 0.2)]
    assert mismatches(planted) == [("toy", 16, 0)]


def test_report_only_rewrites_the_report_without_running(quick):
    before = (quick / "results.jsonl").read_bytes()
    (quick / "results.md").unlink()
    result = runner.invoke(app, ["bench", "scaling", "--quick", "--out", str(quick), "--report-only"])
    assert result.exit_code == 0, result.output
    assert (quick / "results.md").exists() and (quick / "results.jsonl").read_bytes() == before


def test_efficiency_is_one_process_time_over_p_times_p_process_time():
    def row(procs, seconds):
        return {"testbed": "mnist", "n": 64, "procs": procs, "step_seconds": seconds, "bytes_per_selection": 0.0,
                "bound_per_selection": 1.0, "scalar_bytes_per_selection": 8.0, "selections": 1, "selected_steps": 1}

    one, two = summarise([row(1, 1.0), row(1, 3.0), row(1, 2.0), row(2, 0.5), row(2, 0.8), row(2, 0.6)])
    assert (one.step_median, one.step_min, one.step_max) == (2.0, 1.0, 3.0)
    assert two.efficiency == pytest.approx(2.0 / (2 * 0.6)) and one.efficiency == 1.0


@pytest.mark.parametrize("argv, needle", [
    (["--procs", "0"], "--procs"),
    (["--procs", "5"], "--procs"),
    (["--procs", "1,x"], "--procs"),
    (["--procs", "2,2"], "--procs"),
    (["--procs", ","], "--procs"),
    (["--testbeds", "toy,cifar"], "--testbeds"),
    (["--testbeds", ""], "--testbeds"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda", "--testbeds", "toy"], "--device"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, argv, needle):
    out = tmp_path / "out"
    result = runner.invoke(app, ["bench", "scaling", "--out", str(out), "--no-progress", *argv])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out.exists()  # refused before anything ran



def test_report_only_accepts_rows_missing_a_timing_or_holding_null(tmp_path):
    """Rows as an older runner, a crash or a hand edit may leave them: no traceback, '-' where nothing was timed."""
    base = {"testbed": "toy", "repeat": 0, "device": "cpu", "threads": 1, "world_size": 1, "noise_chunk": 4,
            "steps": 2, "selections": 2,
            "selected_steps": 2, "mean_dead_fraction": 0.25, "particle_bytes": 8, "particle_bytes_moved": 0,
            "bytes_per_selection": 0.0, "bound_per_selection": 32.0, "bound_ratio": 0.0,
            "scalar_bytes_gathered": 0, "scalar_bytes_per_selection": None}
    rows = [{**base, "n": 16, "procs": 1, "wall_seconds": 0.2, "step_seconds": 0.1},
            {**base, "n": 16, "procs": 2, "wall_seconds": None, "step_seconds": None},
            {**base, "n": 64, "procs": 1},                       # no timing at all
            {**base, "n": 64, "procs": 2, "step_seconds": 0.3, "bytes_per_selection": None}]
    out = tmp_path / "scaling"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["bench", "scaling", "--quick", "--testbeds", "toy", "--report-only", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "results.md").read_text()
    assert "- (no timing)" in report and (out / "scaling.png").is_file()
