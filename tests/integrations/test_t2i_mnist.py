"""`fvd t2i` on the shipped MNIST DDPM exported as a DDPMPipeline: --populations K, --reward digit."""

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from fvdiffusion.cli import app  # noqa: E402
from fvdiffusion.integrations.diffusers.export_mnist import export_ddpm_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return export_ddpm_pipeline(tmp_path_factory.mktemp("mnist") / "pipe")


def run(pipe_dir, out, method, *extra, seed=0):
    args = ["t2i", "--model", str(pipe_dir), "--populations", "1", "--reward", "digit", "--reward-model", "3",
            "--method", method, "--particles", "8", "--steps", "6", "--seed", str(seed), "--device", "cpu",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def mean_reward(out):
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["prompt"] == "" and len(record["rewards"]) == 8 and len(record["images"]) == 8
    return sum(record["rewards"]) / 8


@pytest.mark.parametrize("seed", [0, 1])
def test_fvd_raises_log_p_of_the_class_over_base(pipe_dir, tmp_path, seed):
    means = {}
    for method in ("fvd", "base"):
        out = tmp_path / method
        result = run(pipe_dir, out, method, seed=seed)
        assert result.exit_code == 0, result.output
        assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()
        assert (out / "images" / "0000" / "00.png").is_file()
        means[method] = mean_reward(out)
    # measured (seeds 0, 1, 2): FVD -0.0034 / -0.026 / -0.10, base -16.9 / -13.3 / -10.4
    assert means["fvd"] > -1.0
    assert means["fvd"] > means["base"] + 5.0


@pytest.mark.parametrize("extra, message", [
    (("--reward-model", "12"), "--reward digit needs --reward-model C, the target class 0..9"),
    (("--prompts", "p.txt"), "give exactly one of --prompts FILE"),
    (("--negative-prompt", "blurry"), "is unconditional: --negative-prompt does not apply"),
])
def test_bad_inputs_fail_with_one_line(pipe_dir, tmp_path, extra, message):
    result = run(pipe_dir, tmp_path / "out", "fvd", *extra)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_prompts_file_refused_for_the_unconditional_pipeline(pipe_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a three\n")
    args = ["t2i", "--model", str(pipe_dir), "--prompts", str(prompts), "--reward", "digit", "--reward-model", "3",
            "--particles", "2", "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "DDPMPipeline is unconditional: it takes no prompts; use --populations K" in result.output
