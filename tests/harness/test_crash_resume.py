"""Crash mid-write, then resume, for every resumable writer; training resumes bit for bit.

Every runner (toy, suite, MNIST bench, t2i, training log) writes its records through
``fvdiffusion.durable.RecordLog``. For each one: finish a tiny run, replace the last record
by the first half of its line (a crash mid-write), resume, and check that the torn line is
gone from the file itself, the record it held is recomputed exactly once, every line parses,
and a second resume recomputes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from fvdiffusion.durable import RecordLog
from fvdiffusion.errors import CorruptRecordsError


def tear_last_line(path: Path) -> dict:
    """Simulate a crash while the last record was being written; return that record."""
    lines = path.read_text().splitlines(keepends=True)
    last = lines[-1]
    path.write_text("".join(lines[:-1]) + last[: len(last) // 2])
    return json.loads(last)


def parsed_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line parses on its own


# --- the writer itself ------------------------------------------------------------------

def test_torn_last_line_is_cut_from_the_file_and_the_next_append_starts_clean(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RecordLog(path, ("k",))
    for k in range(3):
        log.append({"k": k, "v": [k] * 3})
    torn = tear_last_line(path)
    assert torn == {"k": 2, "v": [2, 2, 2]}
    log = RecordLog(path, ("k",))
    assert [r["k"] for r in log.rows] == [0, 1] and not log.done(k=2)
    assert log.repaired_bytes > 0
    assert path.read_text() == '{"k": 0, "v": [0, 0, 0]}\n{"k": 1, "v": [1, 1, 1]}\n'  # gone from the file
    log.append(torn)
    assert [r["k"] for r in parsed_lines(path)] == [0, 1, 2]
    assert RecordLog(path, ("k",)).repaired_bytes == 0


@pytest.mark.parametrize("tail", ['{"k": 9', '{"k": 9}', "garbage\n", '{"k": \n\n', "\x00\x00\x00"])
def test_every_kind_of_torn_tail_is_repaired(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    path.write_text('{"k": 1}\n' + tail)
    log = RecordLog(path, ("k",))
    assert [r["k"] for r in log.rows] == [1] and path.read_text() == '{"k": 1}\n'


def test_an_invalid_line_that_is_not_the_last_is_a_one_line_error_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    content = '{"k": 1}\n{"k": 2\n{"k": 3}\n'
    path.write_text(content)
    with pytest.raises(CorruptRecordsError) as err:
        RecordLog(path, ("k",))
    message = str(err.value)
    assert str(path) in message and "line 2" in message and "\n" not in message
    assert isinstance(err.value, ValueError) and path.read_text() == content  # nothing changed


def test_append_is_one_fsynced_write_and_keep_only_is_atomic(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "sub" / "r.jsonl"
    log = RecordLog(path, ("k", "cfg"))
    log.append({"k": 1, "cfg": {"a": [1, 2]}})
    assert synced  # the data reached the disk before append returned
    log.append({"k": 2, "cfg": {"a": [1, 2]}})
    again = RecordLog(path, ("k", "cfg"))
    assert again.done(k=1, cfg={"a": [1, 2]}) and not again.done(k=1, cfg={"a": [1, 3]})  # keys survive JSON

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((Path(a).name, Path(b).name)) or real_replace(a, b))
    again.keep_only([{"k": 2, "cfg": {"a": [1, 2]}}])
    assert replaced == [("r.jsonl.tmp", "r.jsonl")]
    assert [r["k"] for r in parsed_lines(path)] == [2] and not (path.parent / "r.jsonl.tmp").exists()


# --- fvd toy ----------------------------------------------------------------------------

def test_toy_runner_survives_a_crash_mid_write(tmp_path, monkeypatch):
    from fvdiffusion.bench.common.methods import MethodSpec
    from fvdiffusion.bench.toy import run as toy
    from fvdiffusion.bench.toy.config import ToyBenchConfig
    from fvdiffusion.bench.toy.run import run_toy_bench

    cfg = ToyBenchConfig(problems=("gmm2d-component",), seeds=(1, 2), n_particles=16, num_steps=3, tune=False,
                         methods=(MethodSpec("smc-multinomial", "smc"), MethodSpec("fvd", "fvd")), solver_methods=())
    calls = []
    real = toy.run_cell
    monkeypatch.setattr(toy, "run_cell", lambda *a, **k: calls.append((a[1].label, a[2])) or real(*a, **k))
    first = run_toy_bench(cfg, tmp_path, progress_bar=False)
    path = tmp_path / "results.jsonl"
    torn = tear_last_line(path)
    calls.clear()
    second = run_toy_bench(cfg, tmp_path, progress_bar=False)
    assert calls == [(torn["label"], torn["seed"])]  # exactly the torn cell, once
    rows = parsed_lines(path)
    assert len(rows) == 4 and rows[-1]["label"] == torn["label"] and rows[-1]["seed"] == torn["seed"]
    assert [r["sliced_w2"] for r in first] == [r["sliced_w2"] for r in second]
    calls.clear()
    run_toy_bench(cfg, tmp_path, progress_bar=False)
    assert calls == [] and len(parsed_lines(path)) == 4


# --- fvd suite --------------------------------------------------------------------------

def test_suite_runner_survives_a_crash_mid_write(tmp_path, monkeypatch):
    from fvdiffusion.bench.toy import suite

    cfg = suite.SuiteConfig(problems=("gmm2d-component",), samplers=("ddim",), seeds=(1,), n_particles=16,
                            num_steps=3)
    calls = []

    def fake_cell(problem, sampler, entry, seed, cfg):  # the records, not the sampling, are under test
        calls.append((entry.label, seed))
        return {"problem": problem, "sampler": sampler, "label": entry.label, "seed": seed,
                "resolved": suite._resolved(entry, suite.SAMPLERS[sampler], seed, cfg), "sliced_w2": 0.1 * seed}

    def fake_floor(problem, eta, seed, cfg):
        calls.append(("sampler-floor", seed))
        return 1.5

    monkeypatch.setattr(suite, "run_cell", fake_cell)
    monkeypatch.setattr(suite, "sampler_floor", fake_floor)
    first = suite.run_suite(cfg, tmp_path, progress_bar=False)
    n = len(first)
    path = tmp_path / "results.jsonl"
    torn = tear_last_line(path)
    calls.clear()
    second = suite.run_suite(cfg, tmp_path, progress_bar=False)
    assert calls == [(torn["label"], torn["seed"])]
    assert len(parsed_lines(path)) == n and second == first
    calls.clear()
    suite.run_suite(cfg, tmp_path, progress_bar=False)
    assert calls == [] and len(parsed_lines(path)) == n


# --- fvd bench mnist --------------------------------------------------------------------

def test_mnist_bench_survives_a_crash_mid_write(tmp_path):
    from fvdiffusion.bench.mnist import MnistBenchConfig, run_mnist_bench
    from fvdiffusion.errors import DataMissingError
    from fvdiffusion.zoo.mnist_data import load_mnist

    try:
        load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")
    cfg = MnistBenchConfig(classes=(7,), seeds=(1,), samples_per_cell=8, min_populations=2, n_particles=4,
                           num_steps=3, rows=("base", "fvd"), svdd_candidates=(), dts_rollout_factors=(),
                           scaling_steps=(), tune=False, bootstrap=20, feature_spaces=("evalnet",))
    key = lambda r: (r["class"], r["seed"], r["resolved"])
    computed = []
    first = run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    path = tmp_path / "results.jsonl"
    assert len(computed) == 3
    torn = tear_last_line(path)
    computed.clear()
    second = run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    assert computed == [key(torn)]
    assert sorted(key(r) for r in parsed_lines(path)) == sorted(key(r) for r in first.rows)
    assert len(second.rows) == len(first.rows) == 3  # the report sees every (class, seed) block
    computed.clear()
    third = run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    assert computed == [] and len(third.rows) == 3 and len(parsed_lines(path)) == 3


# --- fvd t2i ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
    import tiny_diffusers

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_diffusers.sd_pipeline().save_pretrained(path)
    yield path
    torch.set_num_threads(before)


def _t2i(tiny_sd, prompts: Path, out: Path, monkeypatch) -> list[str]:
    from fvdiffusion.bench import t2i

    calls = []
    real = t2i.align
    monkeypatch.setattr(t2i, "align", lambda pipe, prompt, *a, **k: calls.append(prompt) or real(pipe, prompt, *a, **k))
    settings = t2i.T2ISettings(model=str(tiny_sd), reward="brightness", reward_model=None, method="fvd",
                               particles=2, steps=2, seed=5, guidance=2.0, dtype="float32", options={"lam": 1.0})
    t2i.run_t2i(settings, prompts, out, device="cpu", show_progress=False)
    return calls


def test_t2i_runner_survives_a_crash_mid_write(tiny_sd, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\nthe sea at night\na cat\n")
    out = tmp_path / "run"
    assert _t2i(tiny_sd, prompts, out, monkeypatch) == ["a red apple", "the sea at night", "a cat"]
    path = out / "metrics.jsonl"
    torn = tear_last_line(path)
    assert _t2i(tiny_sd, prompts, out, monkeypatch) == [torn["prompt"]]
    assert [r["index"] for r in parsed_lines(path)] == [0, 1, 2]
    assert _t2i(tiny_sd, prompts, out, monkeypatch) == []


def test_an_edited_prompt_is_recomputed_and_leaves_no_stale_record(tiny_sd, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\nthe sea at night\n")
    out = tmp_path / "run"
    _t2i(tiny_sd, prompts, out, monkeypatch)
    prompts.write_text("a red apple\na green pear\n")  # prompt 1 edited between runs
    assert _t2i(tiny_sd, prompts, out, monkeypatch) == ["a green pear"]
    rows = parsed_lines(out / "metrics.jsonl")
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, "a red apple"), (1, "a green pear")]
    assert all((out / p).is_file() for r in rows for p in r["images"])
    assert _t2i(tiny_sd, prompts, out, monkeypatch) == []


# --- training log -----------------------------------------------------------------------

def _ddpm_config(steps: int = 6, **overrides):
    from fvdiffusion.train.ddpm import DDPMTrainConfig
    from tiny_models import TINY_UNET

    values = dict(steps=steps, batch_size=3, warmup_steps=2, model=TINY_UNET, log_every=1,
                  checkpoint_every=2)
    values.update(overrides)
    return DDPMTrainConfig(**values)


def _images() -> torch.Tensor:
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in parsed_lines(run_dir / "train_log.jsonl")]


def test_training_log_survives_a_crash_mid_write(tmp_path, monkeypatch):
    from fvdiffusion.train import ddpm
    from fvdiffusion.train.checkpoint import load_checkpoint

    steps_run = []
    real = ddpm.ddpm_loss
    monkeypatch.setattr(ddpm, "ddpm_loss", lambda *a: steps_run.append(1) or real(*a))
    ddpm.train_ddpm(_ddpm_config(4), tmp_path / "straight", _images(), progress=False)
    ddpm.train_ddpm(_ddpm_config(3), tmp_path / "run", _images(), progress=False)
    log = tmp_path / "run" / "train_log.jsonl"
    torn = tear_last_line(log)  # killed while logging step 3 (its checkpoint is the one of step 3)
    assert torn["step"] == 3 and load_checkpoint(tmp_path / "run").step == 3
    steps_run.clear()
    ddpm.train_ddpm(_ddpm_config(4), tmp_path / "run", _images(), resume=True, progress=False)
    assert len(steps_run) == 1  # only step 4 ran
    # the torn window of step 3 is not redone (the checkpoint is past it) and is gone from the file;
    # every other window is logged exactly once, with the uninterrupted run's value
    straight = dict(_losses(tmp_path / "straight"))
    assert _losses(tmp_path / "run") == [(s, straight[s]) for s in (1, 2, 4)]
    steps_run.clear()
    ddpm.train_ddpm(_ddpm_config(4), tmp_path / "run", _images(), resume=True, progress=False)
    assert steps_run == [] and [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 4]


def test_training_log_windows_after_the_checkpoint_are_redone_once(tmp_path):
    from fvdiffusion.train.checkpoint import load_checkpoint
    from fvdiffusion.train.ddpm import train_ddpm

    train_ddpm(_ddpm_config(5), tmp_path / "straight", _images(), progress=False)
    # a run killed hard (SIGKILL) after logging step 5, its last checkpoint at step 4
    train_ddpm(_ddpm_config(5), tmp_path / "run", _images(), progress=False)
    train_ddpm(_ddpm_config(4), tmp_path / "ck4", _images(), progress=False)
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes((tmp_path / "ck4" / "checkpoint.safetensors").read_bytes())
    assert load_checkpoint(tmp_path / "run").step == 4 and _losses(tmp_path / "run")[-1][0] == 5
    train_ddpm(_ddpm_config(5), tmp_path / "run", _images(), resume=True, progress=False)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")  # step 5 once, same value


# --- training: Ctrl-C / SIGTERM resume bit for bit --------------------------------------

def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint.safetensors"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ddpm_interrupted_mid_step_resumes_bit_for_bit(tmp_path, monkeypatch, signum):
    from fvdiffusion.train import ddpm
    from fvdiffusion.train.checkpoint import load_checkpoint
    from fvdiffusion.errors import TrainingInterrupted

    config = _ddpm_config(6, log_every=2, checkpoint_every=100)
    ddpm.train_ddpm(config, tmp_path / "straight", _images(), progress=False)

    calls = []
    real = ddpm.ddpm_loss

    def loss_then_signal(*args):
        calls.append(1)
        if len(calls) == 4:  # the signal lands in the middle of step 4 (generator already drawn)
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setattr(ddpm, "ddpm_loss", loss_then_signal)
    with pytest.raises(KeyboardInterrupt) as stopped:
        ddpm.train_ddpm(config, tmp_path / "run", _images(), progress=False)
    monkeypatch.undo()
    interrupted_at = load_checkpoint(tmp_path / "run").step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    ddpm.train_ddpm(config, tmp_path / "run", _images(), resume=True, progress=False)

    resumed, straight = _state(tmp_path / "run"), _state(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    differ = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert differ == []  # model, EMA, Adam moments, RNG: bit for bit
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")  # the log too (window 3-4 straddled)
    assert interrupted_at == 4  # step 4 was finished, not cut in half
    assert isinstance(stopped.value, TrainingInterrupted)
    assert f"{signal.Signals(signum).name}: stopped at step 4" in str(stopped.value)


def test_a_second_signal_aborts_at_once_without_writing_a_checkpoint(tmp_path, monkeypatch):
    from fvdiffusion.train import ddpm
    from fvdiffusion.errors import TrainingInterrupted

    calls = []
    real = ddpm.ddpm_loss

    def loss_then_two_signals(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(ddpm, "ddpm_loss", loss_then_two_signals)
    with pytest.raises(KeyboardInterrupt) as err:
        ddpm.train_ddpm(_ddpm_config(6), tmp_path, _images(), progress=False)
    assert not isinstance(err.value, TrainingInterrupted)
    from fvdiffusion.train.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path).step == 2  # the last step-boundary checkpoint, untouched


# --- training: bad configs, divergence, corrupt checkpoints -----------------------------

@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("lr", -1e-3), ("steps", 0), ("steps", True),
    ("batch_size", 2.5), ("batch_size", 0), ("log_every", -1), ("checkpoint_every", 0), ("warmup_steps", -1),
    ("seed", -1), ("ema_decay", 1.0), ("ema_decay", float("nan")), ("grad_clip", float("inf")),
    ("weight_decay", float("nan")), ("max_minutes", float("inf")), ("max_minutes", 0.0),
])
def test_ddpm_config_rejects_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=f"DDPMTrainConfig.{field} "):
        _ddpm_config(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("steps", 0), ("batch_size", True), ("weight_decay", float("inf")),
    ("max_scale", 1.0), ("max_rotation_deg", float("nan")), ("seed", -2), ("warmup_steps", 1200),
])
def test_classifier_config_rejects_bad_fields_naming_them(field, value):
    from fvdiffusion.train.classifier import ClassifierTrainConfig

    with pytest.raises(ValueError, match=f"ClassifierTrainConfig.{field} "):
        ClassifierTrainConfig.for_kind("reward", **{field: value})


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("steps", -3), ("weight_decay", -1.0)])
def test_feature_net_config_rejects_bad_fields_naming_them(field, value):
    from fvdiffusion.train.feature_net import FeatureNetTrainConfig

    with pytest.raises(ValueError, match=f"FeatureNetTrainConfig.{field} "):
        FeatureNetTrainConfig(**{field: value})


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    from fvdiffusion.train import ddpm
    from fvdiffusion.train.checkpoint import load_checkpoint
    from fvdiffusion.errors import TrainingDiverged

    calls = []
    real = ddpm.ddpm_loss
    monkeypatch.setattr(ddpm, "ddpm_loss",
                        lambda *a: calls.append(1) or (real(*a) * (float("nan") if len(calls) == 3 else 1.0)))
    with pytest.raises(TrainingDiverged, match="not finite at step 3") as err:
        ddpm.train_ddpm(_ddpm_config(6, log_every=2, checkpoint_every=2), tmp_path, _images(), progress=False)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert load_checkpoint(tmp_path).step == 2  # nothing written from the diverged state
    assert [r["step"] for r in parsed_lines(tmp_path / "train_log.jsonl")] == [2]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header", "nan"])
def test_a_corrupt_checkpoint_is_a_typed_error_naming_the_file(tmp_path, damage):
    from fvdiffusion.errors import CheckpointError
    from fvdiffusion.train.ddpm import train_ddpm

    train_ddpm(_ddpm_config(2), tmp_path, _images(), progress=False)
    path = tmp_path / "checkpoint.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"\x07" * 64)
    elif damage == "header":
        raw[8:40] = b"#" * 32
    if damage != "nan":
        path.write_bytes(bytes(raw))
    else:  # a well-formed file whose weights hold NaN
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        tensors = _state(tmp_path)
        tensors["model.stem.weight"][0] = float("nan")
        save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as err:
        train_ddpm(_ddpm_config(4), tmp_path, _images(), resume=True, progress=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_records_are_strict_json_with_null_for_non_finite(tmp_path):
    path = tmp_path / "results.jsonl"
    log = RecordLog(path, ("cell",))
    log.append({"cell": 1, "fid": float("nan"), "scores": [1.0, float("inf")]})
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "cell": 1, "fid": None, "scores": [1.0, None]}
    assert RecordLog(path, ("cell",)).find(cell=1)["fid"] is None
