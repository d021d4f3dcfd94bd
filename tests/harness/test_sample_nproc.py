"""`fvd sample --nproc K` and torchrun: one population over K processes, the same outputs as one process."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fvdiffusion.cli import app

runner = CliRunner()
TINY = ["--class", "3", "--particles", "8", "--steps", "4", "--no-progress", "--compare", "fvd,smc"]


def _runs(out):
    report = json.loads((out / "metrics.json").read_text())
    return {m: {k: v for k, v in run.items() if k not in ("cost_wall_seconds", "cost_peak_memory_bytes", "distributed")}
            for m, run in report["runs"].items()}, report


def test_two_processes_write_what_one_process_writes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # N = 8 -> the default chunk in a group is max(1, 8 // 16) = 1: pass it to the single process
    result = runner.invoke(app, ["sample", *TINY, "--noise-chunk", "1", "--out", str(one)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", *TINY, "--nproc", "2", "--out", str(two)])
    assert result.exit_code == 0, result.output
    runs_one, _ = _runs(one)
    runs_two, report = _runs(two)
    assert runs_one == runs_two
    for method in ("fvd", "smc"):
        assert (one / f"{method}.png").read_bytes() == (two / f"{method}.png").read_bytes()
        assert report["runs"][method]["distributed"]["world_size"] == 2


def test_torchrun_runs_the_documented_command(tmp_path):
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fvdiffusion.cli",
               "sample", *TINY, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    _, report = _runs(out)
    assert report["runs"]["fvd"]["distributed"]["world_size"] == 2


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--method", "svdd"], "--nproc: method svdd searches from one process"),
    (["--nproc", "5", "--particles", "4"], "--nproc 5: more processes than --particles 4"),
    (["--noise-chunk", "0"], "--noise-chunk must be >= 1"),
    (["--nproc", "2", "--particles", "8", "--noise-chunk", "8"], "--noise-chunk 8: 8 particles make 1 chunk(s), fewer than --nproc 2"),
    (["--option", "noise_chunk=3"], "--noise-chunk"),
])
def test_bad_process_flags_fail_in_one_line(tmp_path, args, needle):
    result = runner.invoke(app, ["sample", "--steps", "2", "--no-progress", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
