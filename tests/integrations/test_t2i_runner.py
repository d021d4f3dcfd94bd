"""`fvd t2i`: prompts in, images + JSONL metrics out, resumable, one-line errors (tiny saved pipeline)."""

import json
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

from fvdiffusion.bench.t2i import read_prompts  # noqa: E402
from fvdiffusion.cli.t2i import register  # noqa: E402

PROMPTS = ["a red apple", "the sea at night", "a cat and a dog"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_diffusers.sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test host for the t2i command."""

    register(app)
    return app


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    return path


def invoke(app, model_dir, prompts, out, *extra):
    args = ["t2i", "--model", str(model_dir), "--prompts", str(prompts), "--reward", "brightness",
            "--particles", "3", "--steps", "3", "--seed", "5", "--guidance", "2.0", "--out", str(out),
            "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_images_and_one_metrics_line_per_prompt(app, model_dir, prompts_txt, tmp_path):
    out = tmp_path / "run"
    result = invoke(app, model_dir, prompts_txt, out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = records(out)
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == [(0, PROMPTS[0], 5), (1, PROMPTS[1], 6)]
    for row in rows:
        assert row["method"] == "fvd" and row["n_particles"] == 3 and len(row["rewards"]) == 3
        assert row["rewards"] == sorted(row["rewards"], reverse=True)
        assert row["cost_vae_decodes"] == row["cost_reward_calls"] + 3
        assert all((out / p).is_file() for p in row["images"]) and len(row["images"]) == 3
    assert json.loads((out / "run.json").read_text())["reward"] == "brightness"


def test_rerun_skips_done_prompts_and_resumes_after_interruption(app, model_dir, prompts_txt, tmp_path):
    out = tmp_path / "run"
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    complete = (out / "metrics.jsonl").read_text()
    # a finished run is not redone
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    assert (out / "metrics.jsonl").read_text() == complete
    # interrupted while writing the second record: the half line is dropped and the prompt redone
    first = complete.splitlines()[0]
    (out / "metrics.jsonl").write_text(first + "\n" + '{"index": 1, "pro')
    result = invoke(app, model_dir, prompts_txt, out)
    assert result.exit_code == 0, result.output
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == first
    assert _without_timing(records(out)) == _without_timing([json.loads(line) for line in complete.splitlines()])
    # a longer prompt file continues where the last one stopped
    prompts_txt.write_text("\n".join(PROMPTS))
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    assert [r["index"] for r in records(out)] == [0, 1, 2]


def _without_timing(rows: list[dict]) -> list[dict]:
    drop = {"cost_wall_seconds", "cost_peak_memory_bytes"}
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def test_drawbench_csv_prompts(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\n"A red colored car.",Colors\n"A cat, on a mat",Misc\n"two\nlines",Misc\n')
    assert read_prompts(path) == ["A red colored car.", "A cat, on a mat", "two\nlines"]


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_bad_inputs_give_one_line_errors(app, model_dir, prompts_txt, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,category\nA car,Colors\n")
    one_line_error(invoke(app, model_dir, tmp_path / "missing.txt", tmp_path / "o1"), "prompts file not found")
    one_line_error(invoke(app, model_dir, csv, tmp_path / "o2"), "no 'Prompts' column")
    one_line_error(CliRunner().invoke(app, ["t2i", "--model", str(model_dir), "--prompts", str(prompts_txt),
                                            "--reward", "sharpness", "--out", str(tmp_path / "o3")]), "unknown reward")
    one_line_error(invoke(app, model_dir, prompts_txt, tmp_path / "o5", "--method", "fvdd"), "method")
    one_line_error(invoke(app, model_dir, prompts_txt, tmp_path / "o6", "--option", "rebirth_noise=2"), "rebirth_noise")
    one_line_error(invoke(app, tmp_path / "no-model", prompts_txt, tmp_path / "o7"), "could not load pipeline")
    assert not (tmp_path / "o7" / "run.json").exists()  # a failed start does not lock the directory


def test_refuses_to_mix_runs_with_different_settings(app, model_dir, prompts_txt, tmp_path):
    out = tmp_path / "run"
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    one_line_error(invoke(app, model_dir, prompts_txt, out, "--lam", "3"), "lam")


def test_cli_help_names_match_the_runner():
    from fvdiffusion.bench import t2i as runner
    from fvdiffusion.cli import t2i as command

    assert command.REWARD_NAMES == tuple(runner.REWARDS) and command.DTYPE_NAMES == runner.DTYPES


# --- damaged prompt files and run files: typed errors naming the file --------------------

@pytest.mark.parametrize("content, line", [
    ('Prompts,Category\n"A red car,Colors\nA cat,Misc\nB dog,Misc\n', 2),   # quote never closed
    ('Prompts,Category\nok,Colors\n"A red car,Colors\n"A cat",Misc\n', 3),  # closed only on a later line
])
def test_a_bad_csv_quote_is_an_error_naming_file_and_line_not_a_merged_prompt(tmp_path, content, line):
    from fvdiffusion.errors import PromptFileError

    path = tmp_path / "prompts.csv"
    path.write_text(content)
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    assert str(path) in str(err.value) and f"line {line}" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.csv"])
def test_a_non_utf8_prompt_file_is_an_error_naming_the_file(tmp_path, name):
    from fvdiffusion.errors import PromptFileError

    path = tmp_path / name
    path.write_bytes(b"Prompts\nok\ncaf\xe9 au lait\n")
    with pytest.raises(PromptFileError, match="line 3 is not UTF-8") as err:
        read_prompts(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_damaged_prompt_and_run_files_give_one_line_cli_errors(app, model_dir, prompts_txt, tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('Prompts\n"never closed\nsecond\n')
    one_line_error(invoke(app, model_dir, bad_csv, tmp_path / "o1"), "bad.csv")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    one_line_error(invoke(app, model_dir, latin, tmp_path / "o2"), "latin.txt")

    out = tmp_path / "run"
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    settings = (out / "run.json").read_text()
    (out / "run.json").write_text(settings[: len(settings) // 2])
    one_line_error(invoke(app, model_dir, prompts_txt, out), "run.json")
    (out / "run.json").write_text(settings)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(metrics[0][:20] + "\n" + metrics[1] + "\n")  # damage that is not a crash
    one_line_error(invoke(app, model_dir, prompts_txt, out), "metrics.jsonl")


def test_metrics_records_are_strict_json(app, model_dir, prompts_txt, tmp_path, monkeypatch):
    """A non-finite reward is written as null, never a bare NaN (metrics.jsonl is read by other tools)."""
    import math

    from fvdiffusion.bench import t2i as runner

    real_align = runner.align

    def align_with_a_nan_reward(*args, **kwargs):
        aligned = real_align(*args, **kwargs)
        aligned.rewards[0] = math.nan
        return aligned

    monkeypatch.setattr(runner, "align", align_with_a_nan_reward)
    out = tmp_path / "run"
    assert invoke(app, model_dir, prompts_txt, out).exit_code == 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
        assert record["rewards"][0] is None


def test_the_last_prompts_seed_is_checked_before_loading(app, model_dir, prompts_txt, tmp_path):
    # two prompts: seed 2**63 - 1 is valid for prompt 0 but prompt 1 would run with 2**63
    args = ["t2i", "--model", str(model_dir), "--prompts", str(prompts_txt), "--reward", "brightness",
            "--seed", str(2**63 - 1), "--out", str(tmp_path / "o"), "--no-progress"]
    one_line_error(CliRunner().invoke(app, args), "seed")
    assert not (tmp_path / "o" / "run.json").exists()


def test_revision_reaches_the_pipeline_loader(app, model_dir, prompts_txt, tmp_path, monkeypatch):
    from fvdiffusion.bench import t2i as runner

    seen = {}

    def loader(model, dtype, device, revision=None):
        seen["revision"] = revision
        raise runner.RunnerError("stop after the loader")

    monkeypatch.setattr(runner, "load_pipeline", loader)
    one_line_error(invoke(app, model_dir, prompts_txt, tmp_path / "o", "--revision", "abc123"), "stop after")
    assert seen == {"revision": "abc123"}
