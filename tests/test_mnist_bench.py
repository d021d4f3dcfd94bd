"""`fvd bench mnist` in a tiny setting on the shipped zoo (CPU): smoke run, resume, report logic."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fvdiffusion.bench.mnist import (
    LabelSummary, MnistBenchConfig, decode_images, particle_methods, plan, population_seed, reproduce_command,
    resolved, run_mnist_bench, value_based_lines,
)
from fvdiffusion.bench.toy import MethodSpec
from fvdiffusion.samplers.svdd import svdd_cost
from fvdiffusion.zoo.mnist_data import DataMissingError, load_mnist



@pytest.fixture(scope="module")
def mnist_data():
    try:
        load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")


def _methods(*labels):
    return tuple(s for s in particle_methods(4) if s.label in labels)


def _read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- configuration (no models) -------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"seeds": (0, 1)}, "seeds"),
    ({"classes": (3, 10)}, "classes"),
    ({"classes": (3, 3)}, "classes"),
    ({"scaling_steps": (50,)}, "scaling_steps"),
    ({"samples_per_class": 1}, "samples_per_class"),
    ({"device": "tpu"}, "device"),
    ({"tuning_grids": {"fvd": [{"rebirth_noise": 2.0}], "smc": [{}]}}, "rebirth_noise"),
    ({"methods": (MethodSpec("x", "smc", {"scheme": "nope"}),)}, "scheme"),
])
def test_config_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MnistBenchConfig(**overrides)


def test_cell_keys_and_population_seeds():
    cfg = MnistBenchConfig.quick()
    spec = MethodSpec("fvd", "fvd", {})
    # the micro-batch does not change samples, so it is not part of the key; the sample count is
    assert resolved(spec, 1, cfg) == resolved(spec, 1, MnistBenchConfig.quick(batch_size=16))
    assert resolved(spec, 1, cfg) != resolved(spec, 1, MnistBenchConfig.quick(samples_per_class=128))
    assert resolved(spec, 1, cfg) != resolved(spec, 2, cfg)
    seeds = {population_seed(s, c, p) for s in (0, 1, 2) for c in range(10) for p in range(4)}
    assert len(seeds) == 3 * 10 * 4


def test_reproduce_command_names_the_preset_when_it_is_one():
    assert reproduce_command(MnistBenchConfig.quick(), Path("q")) == "fvd bench mnist --quick --device cpu --out q"
    assert reproduce_command(MnistBenchConfig(device="cuda"), Path("f")) == "fvd bench mnist --device cuda --out f"
    assert "--seeds 1,2 " in reproduce_command(MnistBenchConfig(seeds=(1, 2)), Path("f"))


def test_plan_has_every_method_and_sweep():
    cfg = MnistBenchConfig(svdd_candidates=(2, 8), dts_rollout_factors=(1, 4), scaling_steps=(25,))
    labels = [p.spec.label for p in plan(cfg, {"fvd": MethodSpec("fvd-tuned", "fvd", {})})]
    for expected in ("real (train)", "base", "bon", "smc-multinomial", "smc-systematic", "vasr", "fvd", "fvd-nu1",
                     "fvd-weighted", "fvd-ctrl", "fvd-tuned", "svdd-M2", "svdd-M8", "dts-R64", "dts-R256",
                     "base-K25", "smc-multinomial-K25", "fvd-K25"):
        assert expected in labels
    assert len(labels) == len(set(labels))


def _summary(label, family, group, fid, wall, calls, budget=None):
    return LabelSummary(label=label, family=family, group=group, budget=budget, note="", fid_by_seed=[fid], fid=fid,
                        fid_by_class={}, accuracy=1.0, reward=0.0, pairwise_distance=1.0, vendi=1.0, lineages=None,
                        calls_per_sample=calls, reward_calls_per_sample=0.0, wall_seconds=wall, genealogy=None,
                        same_as=None)


def test_value_based_lines_report_the_first_matching_budget_and_its_time_ratio():
    fvd = _summary("fvd", "fvd", "main", 10.0, 2.0, 50)
    value = [_summary("svdd-M2", "svdd", "value", 12.0, 4.0, 100, 2),
             _summary("svdd-M4", "svdd", "value", 9.5, 8.0, 200, 4),
             _summary("svdd-M8", "svdd", "value", 9.0, 16.0, 400, 8),
             _summary("dts-R64", "dts", "value", 11.0, 3.0, 50, 64)]
    text = "\n".join(value_based_lines([fvd, *value], fvd))
    assert "svdd first matches FVD's FID at M = 4 (FID 9.50), taking 4.0x FVD's wall time and 4.0x" in text
    assert "no dts budget tried matches FVD's FID; its best (rollouts = 64, FID 11.00) took 1.5x" in text


# --- runs on the shipped zoo --------------------------------------------------------------

def test_smoke_run_of_the_command_writes_results_table_and_figures(tmp_path, mnist_data):
    from fvdiffusion.cli import app

    out = tmp_path / "bench"
    args = ["bench", "mnist", "--out", str(out), "--classes", "3", "--seeds", "1", "--samples-per-class", "8",
            "--particles", "4", "--steps", "3", "--svdd-candidates", "2", "--dts-rollouts", "2", "--scaling-steps", "2",
            "--no-tune", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("results.jsonl", "results.md", "fid_vs_calls.png", "lineages.png", "samples_class3.png"):
        assert (out / name).is_file(), name
    rows = {r["label"]: r for r in _read_rows(out / "results.jsonl")}
    report = (out / "results.md").read_text()
    for label in ("real (train)", "base", "bon", "smc-multinomial", "smc-systematic", "vasr", "fvd", "fvd-nu1",
                  "fvd-weighted", "fvd-ctrl", "svdd-M2", "dts-R8", "base-K2", "smc-multinomial-K2", "fvd-K2"):
        assert f"| {label} |" in report, label
    assert "fvd bench mnist --classes 3 --seeds 1 --samples-per-class 8" in report
    # every method scored on the same number of samples; particle methods at N*K calls per population
    assert {r["n_samples"] for r in rows.values()} == {8}
    assert rows["fvd"]["denoiser_calls"] == rows["smc-multinomial"]["denoiser_calls"] == 2 * 4 * 3
    assert rows["bon"]["populations"] == 4 and rows["bon"]["denoiser_calls"] == 4 * 4 * 3
    assert rows["fvd-K2"]["denoiser_calls"] == 2 * 4 * 2
    assert rows["svdd-M2"]["denoiser_calls"] == 2 * svdd_cost(4, 3, 2)["denoiser_calls"]
    assert len(rows["fvd"]["genealogy"]) == 3 and 1 <= rows["fvd"]["distinct_lineages"] <= 4
    for r in rows.values():
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["vendi"] >= 1
    # the FID compares against class 3: real digits of class 3 are close, unguided samples far
    assert rows["real (train)"]["accuracy"] >= 0.75
    assert rows["real (train)"]["fid"] < rows["base"]["fid"]
    assert decode_images(rows["fvd"]["samples_b64"]).shape == (8, 1, 28, 28)

    # --report-only rebuilds the report from the file and runs nothing
    before = (out / "results.jsonl").read_text()
    (out / "results.md").unlink()
    again = CliRunner().invoke(app, args + ["--report-only"])
    assert again.exit_code == 0, again.output
    assert (out / "results.jsonl").read_text() == before and (out / "results.md").is_file()


def test_an_interrupted_run_resumes_without_recomputing_finished_cells(tmp_path, mnist_data):
    cfg = MnistBenchConfig(classes=(7,), seeds=(1, 2), samples_per_class=4, n_particles=4, num_steps=2,
                           svdd_candidates=(), dts_rollout_factors=(), scaling_steps=(), tune=False,
                           methods=_methods("base", "fvd"))
    key = lambda r: (r["class"], r["seed"], r["resolved"])
    computed = []

    def interrupt_after_three(row):
        computed.append(key(row))
        if len(computed) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=interrupt_after_three)
    first = list(computed)
    assert [key(r) for r in _read_rows(tmp_path / "results.jsonl")] == first

    computed.clear()
    outcome = run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    assert len(computed) == 3 and not set(computed) & set(first)  # 6 cells in all, the first 3 not redone
    assert len(outcome.rows) == 6
    assert sorted(key(r) for r in _read_rows(tmp_path / "results.jsonl")) == sorted(first + computed)

    computed.clear()
    run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    assert computed == []
