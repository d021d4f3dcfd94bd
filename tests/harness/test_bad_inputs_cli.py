"""The committed bad-input suite of the ``fvd`` command (issue 10, rows 3, 6 and 9).

Table-driven: each case is an argv and the text that must name the field or the file. Each
asserts exit code 2, exactly one line on stderr and it starts with ``error:``, the name, and
no traceback. Validation runs before any compute, so the whole table takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fvdiffusion.cli import app

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()
TINY = ["--particles", "4", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad and good input files shared by the table (built once)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"root": root, "file": root / "a_file"}
    paths["file"].write_text("not a directory\n")
    paths["under_file"] = paths["file"] / "sub"
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("a red apple\nthe sea at night\n")
    paths["latin1"] = root / "latin1_prompts.txt"
    paths["latin1"].write_bytes("a red apple\ncaf\xe9 au lait\n".encode("latin-1"))
    paths["corrupt_run"] = root / "corrupt_run"
    paths["corrupt_run"].mkdir()
    (paths["corrupt_run"] / "run.json").write_text('{"model": "tiny", "reward": ')
    paths["corrupt_ckpt"] = root / "corrupt_ckpt"
    paths["corrupt_ckpt"].mkdir()
    (paths["corrupt_ckpt"] / "checkpoint.safetensors").write_bytes(b"\x00" * 7 + os.urandom(300))
    paths["bad_weights"] = root / "bad_weights"
    paths["bad_weights"].mkdir()
    for name in ("ddpm", "reward_classifier", "eval_net"):
        (paths["bad_weights"] / f"{name}.safetensors").write_bytes(b"garbage, not safetensors")
    return paths


def _t2i(files, *extra, out="t2i_out", prompts="prompts"):
    return ["t2i", "--model", str(files["root"] / "no-such-model"), "--prompts", str(files[prompts]),
            "--reward", "brightness", "--out", str(files["root"] / out) if isinstance(out, str) else str(out),
            "--no-progress", *extra]


# (id, argv builder, substring that names the field or the file)
CASES = [
    # --- --device: unknown, not a compute device, unavailable ------------------------------------
    pytest.param(lambda f: ["sample", "--device", "cuda", "--out", str(f["root"] / "s"), *TINY], "--device cuda",
                 id="sample-device-cuda", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")),
    pytest.param(lambda f: ["sample", "--device", "foo", *TINY], "--device foo", id="sample-device-foo"),
    pytest.param(lambda f: ["sample", "--device", "meta", *TINY], "--device meta", id="sample-device-meta"),
    pytest.param(lambda f: ["sample", "--device", "cuda:99", *TINY], "--device cuda:99", id="sample-device-cuda99"),
    pytest.param(lambda f: _t2i(f, "--device", "meta"), "--device meta", id="t2i-device-meta"),
    pytest.param(lambda f: ["bench", "mnist", "--device", "foo"], "--device foo", id="mnist-device-foo"),
    pytest.param(lambda f: ["train", "ddpm", "--device", "meta"], "--device meta", id="train-device-meta"),
    pytest.param(lambda f: ["train", "quality", "--device", "tpu9"], "--device tpu9", id="quality-device"),
    # --- --threads ----------------------------------------------------------------------------------
    pytest.param(lambda f: ["sample", "--threads", "0", *TINY], "--threads", id="sample-threads-0"),
    pytest.param(lambda f: ["toy", "--threads", "0"], "--threads", id="toy-threads-0"),
    # more threads than the machine can run: was a segmentation fault with no message
    pytest.param(lambda f: ["sample", "--threads", "100000", *TINY], "--threads must be at most",
                 id="sample-threads-100000"),
    pytest.param(lambda f: ["toy", "--threads", "100000"], "--threads must be at most", id="toy-threads-100000"),
    pytest.param(lambda f: ["suite", "--threads", "-2"], "--threads", id="suite-threads-neg"),
    pytest.param(lambda f: _t2i(f, "--threads", "0"), "--threads", id="t2i-threads-0"),
    pytest.param(lambda f: ["bench", "mnist", "--threads", "0"], "--threads", id="mnist-threads-0"),
    pytest.param(lambda f: ["bench", "mnist", "--eta", "2", "--out", str(f["root"] / "m")], "eta", id="mnist-eta-2"),
    pytest.param(lambda f: ["bench", "mnist", "--quick", "--tune-only", "--report-only", "--out", str(f["root"] / "m")],
                 "--tune-only", id="mnist-tune-and-report-only"),
    pytest.param(lambda f: ["bench", "truth", "--stage", "compare", "--threads", "0"], "--threads",
                 id="truth-threads-0"),
    pytest.param(lambda f: ["train", "classifier", "--kind", "reward", "--threads", "0"], "--threads",
                 id="train-threads-0"),
    # --- --out: an existing file, or under a file (fails even for root), before any compute ---------
    pytest.param(lambda f: ["sample", "--out", str(f["file"]), *TINY], "--out", id="sample-out-file"),
    pytest.param(lambda f: ["sample", "--out", str(f["under_file"]), *TINY], "a_file", id="sample-out-under-file"),
    pytest.param(lambda f: ["toy", "--out", str(f["file"])], "--out", id="toy-out-file"),
    pytest.param(lambda f: ["suite", "--out", str(f["under_file"])], "--out", id="suite-out-under-file"),
    pytest.param(lambda f: _t2i(f, out=f["file"]), "--out", id="t2i-out-file"),
    pytest.param(lambda f: ["bench", "mnist", "--quick", "--out", str(f["under_file"])], "--out",
                 id="mnist-out-under-file"),
    pytest.param(lambda f: ["train", "ddpm", "--out", str(f["file"])], "--out", id="train-out-file"),
    pytest.param(lambda f: ["train", "export", "--kind", "ddpm", "--run", str(f["corrupt_ckpt"]),
                            "--out", str(f["under_file"])], "--out", id="export-out-under-file"),
    pytest.param(lambda f: ["train", "quality", "--out", str(f["root"])], "--out", id="quality-out-dir"),
    pytest.param(lambda f: ["train", "quality", "--out", str(f["under_file"] / "q.json")], "--out",
                 id="quality-out-under-file"),
    # --- toy sizes and seeds ------------------------------------------------------------------------
    pytest.param(lambda f: ["toy", "--steps", "0", "--out", str(f["root"] / "t")], "--steps", id="toy-steps-0"),
    pytest.param(lambda f: ["toy", "--steps", "5000", "--out", str(f["root"] / "t")], "--steps", id="toy-steps-5000"),
    pytest.param(lambda f: ["toy", "--seed", "-1", "--out", str(f["root"] / "t")], "--seed", id="toy-seed-neg"),
    pytest.param(lambda f: ["toy", "--seed", str(2**64), "--out", str(f["root"] / "t")], "--seed", id="toy-seed-huge"),
    pytest.param(lambda f: ["sample", "--seed", str(2**64), *TINY], "seed", id="sample-seed-huge"),
    pytest.param(lambda f: ["toy", "--particles", str(10**12), "--out", str(f["root"] / "t")], "--particles",
                 id="toy-particles-1e12"),
    pytest.param(lambda f: ["suite", "--steps", "0", "--out", str(f["root"] / "su")], "--steps", id="suite-steps-0"),
    pytest.param(lambda f: ["suite", "--seed", "-1", "--out", str(f["root"] / "su")], "--seed", id="suite-seed-neg"),
    pytest.param(lambda f: ["toy", "--problem", "gmm3d", "--out", str(f["root"] / "t")], "gmm3d", id="toy-problem"),
    # --- sample sizes -------------------------------------------------------------------------------
    pytest.param(lambda f: ["sample", "--particles", str(10**12), "--steps", "2"], "--particles",
                 id="sample-particles-1e12"),
    pytest.param(lambda f: ["sample", "--steps", "5000", "--particles", "4"], "--steps", id="sample-steps-5000"),
    pytest.param(lambda f: ["sample", "--batch-size", "0", *TINY], "--batch-size", id="sample-batch-0"),
    pytest.param(lambda f: ["sample", "--seed", "-1", *TINY], "seed", id="sample-seed-neg"),
    pytest.param(lambda f: ["bench", "mnist", "--bootstrap", str(10**13), "--out", str(f["root"] / "m")],
                 "--bootstrap", id="mnist-bootstrap-1e13"),
    pytest.param(lambda f: ["bench", "mnist", "--particles", str(10**12), "--out", str(f["root"] / "m")],
                 "--particles", id="mnist-particles-1e12"),
    pytest.param(lambda f: ["train", "ddpm", "--batch-size", str(10**12)], "--batch-size", id="train-batch-1e12"),
    pytest.param(lambda f: ["train", "quality", "--n", str(10**13)], "--n", id="quality-n-1e13"),
    # --- --option -----------------------------------------------------------------------------------
    pytest.param(lambda f: ["sample", "--option", "rebirth_nois=0.5", *TINY], "did you mean 'rebirth_noise'",
                 id="option-typo"),
    pytest.param(lambda f: ["sample", "--method", "smc", "--option", "rebirth_noise=0.5", *TINY], "rebirth_noise",
                 id="option-wrong-method"),
    pytest.param(lambda f: ["sample", "--compare", "smc,base", "--option", "rebirth_noise=0.5", *TINY],
                 "not an option of smc/base", id="option-no-compared-method"),
    pytest.param(lambda f: ["sample", "--option", "final_selection=Flase", *TINY], "final_selection",
                 id="option-bool-strict"),
    pytest.param(lambda f: ["sample", "--option", "final_selection=2", *TINY], "final_selection",
                 id="option-bool-number"),
    pytest.param(lambda f: ["sample", "--option", "lam=2", *TINY], "--lam", id="option-lam"),
    pytest.param(lambda f: ["sample", "--option", "seed=3", *TINY], "--seed", id="option-seed"),
    pytest.param(lambda f: ["sample", "--option", "rebirth_noise=abc", *TINY], "rebirth_noise", id="option-float"),
    pytest.param(lambda f: ["sample", "--option", "rebirth_noise=2", *TINY], "rebirth_noise", id="option-range"),
    pytest.param(lambda f: ["sample", "--option", "oops", *TINY], "--option", id="option-not-pair"),
    pytest.param(lambda f: _t2i(f, "--option", "rebirth_nose=1"), "did you mean 'rebirth_noise'", id="t2i-option-typo"),
    pytest.param(lambda f: _t2i(f, "--option", "lam=3"), "--lam", id="t2i-option-lam"),
    pytest.param(lambda f: ["sample", "--method", "fvdd", *TINY], "fvdd", id="sample-method-typo"),
    # --- non-finite floats --------------------------------------------------------------------------
    pytest.param(lambda f: _t2i(f, "--guidance", "nan"), "--guidance", id="t2i-guidance-nan"),
    pytest.param(lambda f: _t2i(f, "--lam", "nan"), "--lam", id="t2i-lam-nan"),
    pytest.param(lambda f: _t2i(f, "--eta", "1.5"), "--eta", id="t2i-eta-above-1"),
    pytest.param(lambda f: _t2i(f, "--eta", "nan"), "--eta", id="t2i-eta-nan"),
    pytest.param(lambda f: _t2i(f, "--option", "eta=0.5"), "--eta", id="t2i-option-eta"),
    pytest.param(lambda f: _t2i(f, "--height", "0"), "--height", id="t2i-height-0"),
    pytest.param(lambda f: _t2i(f, "--width", "-8"), "--width", id="t2i-width-negative"),
    pytest.param(lambda f: _t2i(f, "--negative-prompt", " "), "--negative-prompt", id="t2i-negative-prompt-empty"),
    pytest.param(lambda f: _t2i(f, "--eval-reward", "sharpness"), "--eval-reward", id="t2i-eval-reward-unknown"),
    pytest.param(lambda f: _t2i(f, "--eval-reward", "imagereward"), "--eval-reward", id="t2i-eval-reward-removed"),
    pytest.param(lambda f: _t2i(f, "--eval-reward-model", "x"), "--eval-reward", id="t2i-eval-model-alone"),
    pytest.param(lambda f: _t2i(f, "--shard", "2/2"), "--shard", id="t2i-shard-out-of-range"),
    pytest.param(lambda f: _t2i(f, "--shard", "0/0"), "--shard", id="t2i-shard-zero"),
    pytest.param(lambda f: _t2i(f, "--shard", "first"), "--shard", id="t2i-shard-not-i-of-n"),
    pytest.param(lambda f: _t2i(f, "--shard", "0/2", "--merge"), "--merge", id="t2i-merge-with-shard"),
    pytest.param(lambda f: ["sample", "--lam", "nan", *TINY], "--lam", id="sample-lam-nan"),
    pytest.param(lambda f: ["sample", "--eta", "inf", *TINY], "--eta", id="sample-eta-inf"),
    pytest.param(lambda f: ["train", "ddpm", "--lr", "nan"], "--lr", id="train-lr-nan"),
    pytest.param(lambda f: ["train", "features", "--lr", "inf"], "--lr", id="train-lr-inf"),
    # --- bad files: named in the one line -----------------------------------------------------------
    pytest.param(lambda f: _t2i(f, prompts="latin1"), "latin1_prompts.txt", id="t2i-prompts-not-utf8"),
    pytest.param(lambda f: _t2i(f, out=f["corrupt_run"]), "run.json", id="t2i-corrupt-run-json"),
    pytest.param(lambda f: ["train", "export", "--kind", "ddpm", "--run", str(f["corrupt_ckpt"]),
                            "--out", str(f["root"] / "exported")], "checkpoint.safetensors",
                 id="export-corrupt-checkpoint"),
    pytest.param(lambda f: ["train", "ddpm", "--resume", "--steps", "1", "--out", str(f["corrupt_ckpt"])],
                 "checkpoint.safetensors", id="train-resume-corrupt-checkpoint"),
    pytest.param(lambda f: ["sample", "--weights-dir", str(f["bad_weights"]), "--out", str(f["root"] / "w"), *TINY],
                 "ddpm.safetensors", id="sample-corrupt-weights"),
]


def _check_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], (needle, lines[0])


class ComputeReached(AssertionError):
    """A bad input got past validation into sampling, training or a long wait."""


@pytest.fixture
def no_compute(monkeypatch):
    """Sampling and benchmark entry points fail the case, and so does anything slower than 60 s."""
    import signal

    import fvdiffusion
    import fvdiffusion.bench.mnist
    import fvdiffusion.bench.toy.run
    import fvdiffusion.bench.toy.suite
    import fvdiffusion.train.quality

    def reached(*args, **kwargs):
        raise ComputeReached("validation let a bad input through to compute")

    for module, name in [(fvdiffusion, "sample"), (fvdiffusion.bench.toy.run, "run_toy_bench"),
                         (fvdiffusion.bench.toy.suite, "run_suite"), (fvdiffusion.bench.mnist, "run_mnist_bench"),
                         (fvdiffusion.train.quality, "ddpm_quality")]:
        monkeypatch.setattr(module, name, reached)

    def too_slow(signum, frame):
        raise ComputeReached("no error within 60 s: validation let a bad input through to compute")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("build, needle", CASES)
def test_bad_input_is_one_named_line(files, build, needle, no_compute):
    _check_one_line_error(runner.invoke(app, build(files)), needle)


def test_unwritable_out_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the under-a-file cases cover --out for root")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _check_one_line_error(runner.invoke(app, ["sample", "--out", str(locked / "run"), *TINY]), "not writable")
    finally:
        locked.chmod(0o700)


def test_version():
    import fvdiffusion

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and fvdiffusion.__version__ in result.output


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--threads", "0"], "--threads"),
    (["toy", "--steps", "5000"], "--steps"),
    (["sample", "--device", "meta"], "--device meta"),
])
def test_no_traceback_reaches_stderr_of_the_real_process(argv, needle):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FVD_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "fvdiffusion.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--threads", "abc"], "--threads"),          # typer cannot parse it
    (["sample", "--bogus"], "--bogus"),                     # no such option
    (["train", "export"], "--kind"),                        # missing required option
    (["nonsense"], "nonsense"),                             # no such command
])
def test_usage_errors_are_one_line_too(argv, needle, capsys):
    from fvdiffusion.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_help_and_no_arguments_exit_0(capsys):
    from fvdiffusion.cli import main

    for argv in ([], ["toy", "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0 and "Usage" in capsys.readouterr().out


# --- every command goes through the one error path ------------------------------------------

def _commands(typer_app):
    for info in typer_app.registered_commands:
        yield info.name, info.callback
    for group in typer_app.registered_groups:
        for name, callback in _commands(group.typer_instance):
            yield f"{group.name} {name}", callback


def test_every_command_uses_the_one_error_path():
    commands = dict(_commands(app))
    assert {"toy", "suite", "sample", "t2i", "bench mnist", "train ddpm", "train classifier", "train features",
            "train export", "train quality"} <= set(commands)
    for name, callback in commands.items():
        assert getattr(callback, "__fvd_handles_errors__", False), f"{name} is not wrapped in handles_errors"


# --- --threads: an explicit default of one torch thread per process ------------------------------

# argv that gets past set_threads and then fails on --out, before any model is loaded
THREADS_ARGV = {
    "sample": lambda f: ["sample", "--out", str(f["file"]), *TINY],
    "toy": lambda f: ["toy", "--out", str(f["file"])],
    "suite": lambda f: ["suite", "--out", str(f["under_file"])],
    "t2i": lambda f: _t2i(f, out=f["file"]),
    "bench mnist": lambda f: ["bench", "mnist", "--quick", "--out", str(f["under_file"])],
    "bench scaling": lambda f: ["bench", "scaling", "--quick", "--out", str(f["file"]), "--no-progress"],
    "bench truth": lambda f: ["bench", "truth", "--stage", "reference", "--quick", "--out", str(f["file"]),
                              "--no-progress"],
    "train ddpm": lambda f: ["train", "ddpm", "--out", str(f["file"])],
    "train classifier": lambda f: ["train", "classifier", "--kind", "reward", "--out", str(f["file"])],
    "train features": lambda f: ["train", "features", "--out", str(f["file"])],
    "train export": lambda f: ["train", "export", "--kind", "ddpm", "--run", str(f["corrupt_ckpt"]),
                               "--out", str(f["under_file"])],
    "train quality": lambda f: ["train", "quality", "--out", str(f["root"])],
    "convert aesthetic": lambda f: ["convert", "aesthetic", str(f["file"]), "--out", str(f["under_file"])],
    "export diffusers-ddpm": lambda f: ["export", "diffusers-ddpm", "--out", str(f["file"])],
}


def test_every_command_has_threads_defaulting_to_one():
    """No command leaves torch's thread count to torch (one per core: many times slower on a busy CPU)."""
    import inspect

    from fvdiffusion.cli.errors import DEFAULT_THREADS

    assert DEFAULT_THREADS == 1
    commands = dict(_commands(app))
    assert set(THREADS_ARGV) == set(commands), "a new command needs a THREADS_ARGV case"
    for name, callback in commands.items():
        param = inspect.signature(callback).parameters.get("threads")
        assert param is not None, f"{name} has no --threads"
        assert param.default.default == 1, f"{name}: --threads defaults to {param.default.default!r}"
        assert "default 1" in (param.default.help or ""), f"{name}: --help does not say the default"


@pytest.mark.parametrize("name", sorted(THREADS_ARGV))
@pytest.mark.parametrize("given, expected", [([], 1), (["--threads", "3"], 3)])
def test_threads_are_set_before_anything_else(files, no_compute, monkeypatch, name, given, expected):
    """The default (1) or the given --threads reaches torch.set_num_threads, first thing in the command."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    argv = THREADS_ARGV[name](files)
    result = runner.invoke(app, [*argv, *given])
    assert result.exit_code == 2 and "--out" in result.stderr, result.output  # stopped at --out, as planned
    assert calls == [expected], (name, calls)


def _library_errors():
    """Every exception class (not warning) of fvdiffusion.errors, where all of them live; safetensors'; MemoryError."""
    import safetensors

    from fvdiffusion import errors

    ours = [cls for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning)
            and cls.__module__ == errors.__name__]
    names = {cls.__name__ for cls in ours}
    assert {"PromptFileError", "RunFileError", "UnsupportedPipelineError", "CorruptRecordsError", "DenoiserError",
            "RewardError", "MissingExtraError", "MissingWeightsError", "ConfigError", "CheckpointError",
            "TrainingDiverged", "WeightsError", "WeightsMissingError", "DataCorruptError", "DataMissingError"} <= names
    return [*ours, safetensors.SafetensorError, MemoryError]


def test_every_library_error_type_becomes_one_line():
    from fvdiffusion.cli import errors

    for cls in _library_errors():
        exc = cls("x.safetensors: first line\nsecond line")
        message = errors.describe(exc)
        assert message is not None and "\n" not in message and "first line" in message, (cls, message)


def test_an_interrupted_command_ends_with_one_line_and_exit_130():
    import typer

    from fvdiffusion.cli.errors import handles_errors

    host = typer.Typer()

    @host.command()
    @handles_errors
    def train() -> None:
        raise KeyboardInterrupt("SIGINT: stopped at step 3 and wrote run/checkpoint.safetensors; "
                                "run the same command with --resume to continue")

    result = runner.invoke(host, [])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("interrupted: SIGINT: stopped at step 3")


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only expected failures become one line: an unexpected exception type is not hidden."""
    from fvdiffusion.cli import errors

    def boom():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.handles_errors(boom)()


# --- options: parsed by the config field types --------------------------------------------------

@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("0", False), ("no", False),
                                            ("TRUE", True), ("yes", True), ("1", True)])
def test_option_booleans_are_parsed_strictly(text, expected):
    import fvdiffusion as fv
    from fvdiffusion.cli.options import parse_options

    options = parse_options([f"final_selection={text}"], ["smc", "fvd"])
    assert options == {"final_selection": expected} and type(options["final_selection"]) is bool
    assert fv.make_config("smc", **options).final_selection is expected


def test_options_go_to_the_methods_that_have_them():
    from fvdiffusion.cli.options import options_for, parse_options

    options = parse_options(["rebirth_noise=0.5", "scheme=systematic", "ess_threshold=none"], ["fvd", "smc"])
    assert options == {"rebirth_noise": 0.5, "scheme": "systematic", "ess_threshold": None}
    assert options_for("fvd", options) == {"rebirth_noise": 0.5}
    assert options_for("smc", options) == {"scheme": "systematic", "ess_threshold": None}


# --- strict JSON and memory bounded by the batch size (row 9) -------------------------------------

def test_strict_json_writes_null_for_non_finite():
    from fvdiffusion.jsonsafe import strict_json_dumps

    text = strict_json_dumps({"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": torch.tensor(float("nan"))})
    assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": None}


def test_sample_evaluates_in_chunks_of_the_batch_size_and_writes_strict_json(tmp_path, monkeypatch):
    from fvdiffusion.zoo import loaders

    seen: list[int] = []
    real = loaders.load_eval_net

    def counting_eval_net(*args, **kwargs):
        net = real(*args, **kwargs)

        def judge(images):
            seen.append(images.shape[0])
            return net(images)

        return judge

    monkeypatch.setattr(loaders, "load_eval_net", counting_eval_net)
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample", "--class", "3", "--particles", "10", "--steps", "2", "--batch-size", "3",
                                 "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sum(seen) == 10 and max(seen) <= 3
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
