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


# --- issue 12 item 7: negative prompt, size, eta, eval reward, base comparison, shards ---------

def _image_tensor(out: Path, paths: list[str]):
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(out / p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def test_negative_prompt_size_and_eta_reach_align(app, model_dir, prompts_txt, tmp_path, monkeypatch):
    from PIL import Image

    from fvdiffusion.bench import t2i as runner

    seen = []
    real_align = runner.align

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_align(*args, **kwargs)

    monkeypatch.setattr(runner, "align", spy)
    out = tmp_path / "run"
    result = invoke(app, model_dir, prompts_txt, out, "--negative-prompt", "blurry", "--height", "24",
                    "--width", "20", "--eta", "0.3")
    assert result.exit_code == 0, result.output
    assert [(k["negative_prompt"], k["height"], k["width"], k["eta"]) for k in seen] == [("blurry", 24, 20, 0.3)] * 2
    for row in records(out):
        assert all(Image.open(out / p).size == (20, 24) for p in row["images"])
    stored = json.loads((out / "run.json").read_text())
    assert (stored["negative_prompt"], stored["height"], stored["width"], stored["options"]["eta"]) == \
        ("blurry", 24, 20, 0.3)
    one_line_error(invoke(app, model_dir, prompts_txt, out, "--negative-prompt", "blurry", "--height", "24",
                          "--width", "20", "--eta", "0.0"), "options")  # another eta is another run
    odd = invoke(app, model_dir, prompts_txt, tmp_path / "odd", "--height", "25")  # known only once loaded
    assert odd.exit_code == 2 and "Traceback" not in odd.output
    errors = [line for line in odd.stderr.splitlines() if line.startswith("error: ")]  # diffusers' load bars aside
    assert len(errors) == 1 and "--height 25" in errors[0] and "scale factor 2" in errors[0], odd.stderr
    assert not (tmp_path / "odd" / "run.json").exists()


def test_eval_reward_is_reported_and_never_used_for_selection(app, model_dir, prompts_txt, tmp_path):
    from fvdiffusion.rewards.image_rewards import Colourfulness

    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert invoke(app, model_dir, prompts_txt, plain).exit_code == 0
    result = invoke(app, model_dir, prompts_txt, scored, "--eval-reward", "colourfulness")
    assert result.exit_code == 0, result.output
    for a, b in zip(records(plain), records(scored)):
        assert b["eval_reward"] == "colourfulness" and len(b["eval_rewards"]) == 3
        # the selection, rewards and images are those of the run without an eval reward
        assert _without_timing([a]) == _without_timing([{k: v for k, v in b.items() if not k.startswith("eval_")}])
        # eval_rewards[i] scores images[i] (the PNGs are 8-bit: a loose tolerance)
        expected = Colourfulness()(_image_tensor(scored, b["images"]))
        assert b["eval_rewards"] == pytest.approx(expected.tolist(), abs=0.5)
        assert b["eval_rewards"] != pytest.approx(b["rewards"])
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["done"] == 2 and summary["eval_reward"] == "colourfulness"
    assert summary["mean_eval_reward_of_best"] == pytest.approx(
        sum(r["eval_rewards"][0] for r in records(scored)) / 2)


def test_compare_base_writes_a_base_row_and_an_aligned_row(app, model_dir, prompts_txt, tmp_path):
    import torch
    from PIL import Image

    base_out, out = tmp_path / "base", tmp_path / "cmp"
    assert invoke(app, model_dir, prompts_txt, base_out, "--method", "base").exit_code == 0
    result = invoke(app, model_dir, prompts_txt, out, "--compare-base", "--lam", "20")
    assert result.exit_code == 0, result.output
    for base_row, row in zip(records(base_out), records(out)):
        # the base row is method=base from the prompt's seed: the same images a base run gives
        assert row["base_rewards"] == pytest.approx(base_row["rewards"])
        assert torch.equal(_image_tensor(out, row["base_images"]), _image_tensor(base_out, base_row["images"]))
        grid = Image.open(out / row["grid"]).convert("RGB")
        w = h = 16
        assert grid.size == (64 + 3 * (w + 2), 2 * (h + 2))
        for r, paths in enumerate((row["base_images"], row["images"])):
            for c, path in enumerate(paths):
                x, y = 64 + c * (w + 2), r * (h + 2)
                assert grid.crop((x, y, x + w, y + h)).tobytes() == Image.open(out / path).convert("RGB").tobytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_best_reward"] > summary["base_mean_best_reward"]  # brightness steered at lam 20


def test_shards_write_their_own_files_and_merge_into_one_run(app, model_dir, tmp_path, monkeypatch):
    from fvdiffusion.bench import t2i as runner

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert invoke(app, model_dir, prompts, single).exit_code == 0
    for i in (0, 1):
        result = invoke(app, model_dir, prompts, sharded, "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
    assert not (sharded / "metrics.jsonl").exists() and not (sharded / "summary.json").exists()
    assert [r["index"] for r in records_of(sharded / "metrics.shard-0-of-2.jsonl")] == [0, 2]
    assert [r["index"] for r in records_of(sharded / "metrics.shard-1-of-2.jsonl")] == [1]

    def no_loading(*args, **kwargs):
        raise runner.RunnerError("a shard or merge rerun must not load the pipeline")

    monkeypatch.setattr(runner, "load_pipeline", no_loading)
    before = (sharded / "metrics.shard-0-of-2.jsonl").read_text()
    assert invoke(app, model_dir, prompts, sharded, "--shard", "0/2").exit_code == 0  # resume: all done
    assert (sharded / "metrics.shard-0-of-2.jsonl").read_text() == before
    result = invoke(app, model_dir, prompts, sharded)  # no --shard: merge, nothing left to run
    assert result.exit_code == 0, result.output
    merged = sorted(records(sharded), key=lambda r: r["index"])
    assert _without_timing(merged) == _without_timing(records(single))
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["done"] == 3 and summary["missing"] == []
    assert summary == json.loads((single / "summary.json").read_text())
    # merging again adds nothing
    assert invoke(app, model_dir, prompts, sharded, "--merge").exit_code == 0
    assert len(records(sharded)) == 3


def test_merge_reports_missing_prompts_without_sampling(app, model_dir, tmp_path, monkeypatch):
    from fvdiffusion.bench import t2i as runner

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    assert invoke(app, model_dir, prompts, out, "--shard", "1/2").exit_code == 0
    monkeypatch.setattr(runner, "load_pipeline", lambda *a, **k: pytest.fail("--merge must not sample"))
    result = invoke(app, model_dir, prompts, out, "--merge")
    assert result.exit_code == 0, result.output
    assert [r["index"] for r in records(out)] == [1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 1 and summary["missing"] == [0, 2]


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
