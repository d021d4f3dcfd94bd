"""`fvd sample` end to end on the shipped zoo (tiny settings), and its one-line errors."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from fvdiffusion.cli import app
from fvdiffusion.zoo.loaders import WEIGHTS_DIR

runner = CliRunner()
TINY = ["--particles", "4", "--steps", "3", "--no-progress"]


def test_sample_writes_grid_and_metrics(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample", "--class", "3", "--method", "fvd", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    run = report["runs"]["fvd"]
    assert report["class"] == 3 and (out / "fvd.png").stat().st_size > 0
    for key in ("reward_mean", "eval_accuracy", "distinct_lineages", "cost_denoiser_calls", "cost_reward_calls",
                "cost_wall_seconds", "config"):
        assert key in run
    assert run["cost_denoiser_calls"] == 4 * 3 and run["config"]["method"] == "fvd"


def test_compare_writes_one_figure(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["sample", "--class", "1", "--compare", "fvd,smc,base", "--out", str(out),
                                 "--option", "rebirth_noise=0.5", *TINY])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["runs"]) == {"fvd", "smc", "base"} and (out / "compare.png").exists()
    assert report["runs"]["fvd"]["config"]["rebirth_noise"] == 0.5  # options go to methods that have them


@pytest.mark.parametrize("args,needle", [
    (["--class", "11"], "--class must be a digit 0-9, got 11"),
    (["--particles", "0"], "--particles must be >= 1, got 0"),
    (["--method", "nope"], "invalid method='nope'"),
    (["--option", "rebirth_noise=2"], "invalid rebirth_noise=2"),
    (["--option", "oops"], "--option expects KEY=VALUE"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, args, needle):
    result = runner.invoke(app, ["sample", "--out", str(tmp_path), *TINY, *args])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_missing_and_corrupted_weights(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, weights)
    (weights / "reward_classifier.safetensors").unlink()
    result = runner.invoke(app, ["sample", "--weights-dir", str(weights), "--out", str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2 and "reward_classifier.safetensors" in result.output
    assert "Traceback" not in result.output

    data = (WEIGHTS_DIR / "ddpm.safetensors").read_bytes()
    (weights / "ddpm.safetensors").write_bytes(data[: len(data) // 3])
    shutil.copy(WEIGHTS_DIR / "reward_classifier.safetensors", weights)
    result = runner.invoke(app, ["sample", "--weights-dir", str(weights), "--out", str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2 and "ddpm.safetensors" in result.output
    assert "Traceback" not in result.output


def test_sample_runs_with_one_thread_by_default(tmp_path, monkeypatch):
    """torch's own choice (one thread per core) made one UNet call 6-26x slower on a busy CPU: 1 is set."""
    seen: list[int] = []
    real = torch.set_num_threads

    def record(n):
        seen.append(n)
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    real(2)
    try:
        result = runner.invoke(app, ["sample", "--out", str(tmp_path / "run"), *TINY])
        assert result.exit_code == 0, result.output
        assert seen == [1] and torch.get_num_threads() == 1
    finally:
        real(1)
