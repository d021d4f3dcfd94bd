"""`fvd bench mnist` in a tiny setting on the shipped zoo (CPU): config, keys, FK schedule, tuning
choice, smoke run with report, resume, and worker processes giving the same cells."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.mnist import (
    MnistBenchConfig, decode_images, encode_images, fk_steering_options, method_rows, plan, population_seed,
    preset_name, reproduce_command, resolved, run_mnist_bench, tuning_families,
)
from fvdiffusion.bench.mnist.methods import sampler_config, tuning_points
from fvdiffusion.bench.mnist.run import choose_tuned
from fvdiffusion.errors import DataMissingError
from fvdiffusion.samplers.smc import SMCConfig
from fvdiffusion.zoo.mnist_data import load_mnist


@pytest.fixture(scope="module")
def mnist_data():
    try:
        load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")


def _read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tiny(**overrides):
    values = dict(classes=(7,), seeds=(1,), samples_per_cell=8, min_populations=2, n_particles=4, num_steps=3,
                  rows=("base", "fvd"), svdd_candidates=(), dts_rollout_factors=(), scaling_steps=(), tune=False,
                  bootstrap=20, feature_spaces=("evalnet",))
    values.update(overrides)
    return MnistBenchConfig(**values)


# --- configuration (no models) -------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"seeds": (0, 1)}, "seeds"),
    ({"classes": (3, 10)}, "classes"),
    ({"classes": (3, 3)}, "classes"),
    ({"scaling_steps": (50,)}, "scaling_steps"),
    ({"solver_steps": (1,)}, "solver_steps"),
    ({"solver_steps": (20, 20)}, "solver_steps"),
    ({"samples_per_cell": 1}, "samples_per_cell"),
    ({"device": "tpu"}, "device"),
    ({"rows": ("fvd", "nope")}, "rows"),
    ({"families": ("fvd", "nope")}, "families"),
    ({"grid_points": 99}, "grid_points"),
    ({"feature_spaces": ("pixels",)}, "feature_spaces"),
    ({"bootstrap": 3}, "bootstrap"),
    ({"eta": 1.5}, "eta"),
    ({"eta": True}, "eta"),
])
def test_config_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MnistBenchConfig(**overrides)


def _resampling_steps(options, num_steps):
    cfg = SMCConfig(num_steps=num_steps, **options)
    return [i for i in range(num_steps) if cfg.is_selection_step(i, num_steps)]


@pytest.mark.parametrize("num_steps, expected", [
    (100, [20, 40, 60, 80]),   # their launch script on 100 steps
    (50, [10, 20, 30, 40]),
    (25, [5, 10, 15, 20]),
])
def test_fk_schedule_resamples_every_fifth_of_the_steps_inside_their_window(num_steps, expected):
    options = fk_steering_options(num_steps)
    assert options["potential"] == "diff" and options["scheme"] == "multinomial"
    assert _resampling_steps(options, num_steps) == expected


def test_every_family_starts_from_its_default_row_and_has_the_same_grid_size():
    families = tuning_families(25)
    rows = {r.spec.label: r.spec for r in method_rows(64, 25)}
    for family in families:
        if family.name == "fvd":  # explicit points that do not move with the defaults: the toy suite's DDPM pick first
            assert family.grid[0] == {"rebirth_noise": 0.5, "nu_by_copies": True, "parent_allocation": "multinomial"}
            assert all("parent_allocation" in p for p in family.grid)
        else:
            assert family.grid[0] == rows[family.default_row].options, family.name
        assert len({json.dumps(p, sort_keys=True) for p in family.grid}) == len(family.grid)  # no repeated point
    # the paper preset's families get the same budget of points
    paper = MnistBenchConfig.preset("paper")
    assert {len(f.grid) for f in families if f.name in paper.families} == {paper.grid_points}
    cfg = MnistBenchConfig.preset("cpu")
    per_family = {}
    for point in tuning_points(cfg):
        per_family[point.family] = per_family.get(point.family, 0) + 1
    assert set(per_family.values()) == {cfg.grid_points} and len(per_family) == 5


def test_cell_keys_and_population_seeds():
    cfg = MnistBenchConfig.quick()
    spec = MethodSpec("fvd", "fvd", {})
    # the micro-batch and the worker count do not change samples, so they are not part of the key
    assert resolved(spec, 1, cfg) == resolved(spec, 1, MnistBenchConfig.quick(batch_size=16, workers=3))
    assert resolved(spec, 1, cfg) != resolved(spec, 1, MnistBenchConfig.quick(samples_per_cell=128))
    assert resolved(spec, 1, cfg) != resolved(spec, 2, cfg)
    seeds = {population_seed(s, c, p) for s in (0, 1, 2) for c in range(10) for p in range(4)}
    assert len(seeds) == 3 * 10 * 4


def test_presets_are_recognised_up_to_execution_settings_and_reproduced():
    cpu = MnistBenchConfig.preset("cpu")
    assert preset_name(cpu) == "cpu" and preset_name(MnistBenchConfig.preset("cpu", device="cuda", workers=1)) == "cpu"
    assert preset_name(MnistBenchConfig.preset("cpu", seeds=(1, 2))) is None
    assert reproduce_command(cpu, Path("o")) == "fvd bench mnist --preset cpu --device cpu --workers 2 --out o"
    custom = reproduce_command(MnistBenchConfig.preset("cpu", seeds=(1, 2)), Path("o"))
    assert "--seeds 1,2 " in custom and "--grid-points 3" in custom and "--methods 'smc-multinomial," in custom


def test_plan_has_every_row_tuned_row_and_sweep_once():
    cfg = MnistBenchConfig(svdd_candidates=(2, 8), dts_rollout_factors=(1, 4), scaling_steps=(25,))
    tuned = {f: MethodSpec(f"{f}-tuned", "smc" if f != "fvd" and f != "vasr" else f, {}) for f in cfg.families}
    labels = [p.spec.label for p in plan(cfg, tuned)]
    for expected in ("real (train)", "base", "bon", "smc-multinomial", "smc-fk", "smc-ess", "smc-systematic", "vasr",
                     "fvd", "fvd-nu1", "fvd-weighted", "fvd-ctrl", "fvd-tuned", "smc-tuned", "smc-fk-tuned",
                     "smc-ess-tuned", "vasr-tuned", "svdd-M2", "svdd-M8", "dts-R64", "dts-R256", "base-K25",
                     "smc-multinomial-K25", "fvd-K25"):
        assert expected in labels
    assert len(labels) == len(set(labels))


def test_tuning_picks_the_smallest_worst_case_ratio_and_skips_incomplete_families():
    cfg = MnistBenchConfig(families=("fvd", "smc", "smc-fk"), grid_points=2, tuning_classes=(2,))
    fids = {  # per grid point: FID in two spaces
        "fvd": [{"a": 1.0, "b": 10.0}, {"a": 1.5, "b": 3.0}],    # point 1 is worse in a, far better in b
        "smc": [{"a": 2.0, "b": 4.0}, {"a": 2.2, "b": 4.1}],
        "smc-fk": [{"a": 5.0, "b": 5.0}, None],                  # one point missing: no tuned row
    }
    rows, index = {}, {}
    for point in tuning_points(cfg):
        i = index.get(point.family, 0)
        index[point.family] = i + 1
        if fids[point.family][i] is not None:
            key = (2, 0, resolved(point.spec, 0, cfg, tuning=True))
            rows[key] = {"fid": fids[point.family][i]}
    scores, tuned, strongest = choose_tuned(cfg, rows, lambda row: SimpleNamespace(fid=row["fid"]), spaces=("a", "b"))
    assert tuned["fvd"].options == tuning_families(cfg.num_steps)[0].grid[1]
    assert tuned["smc"].options == {} and tuned["smc"].label == "smc-tuned"
    assert "smc-fk" not in tuned and strongest == "smc-tuned"
    assert [s.chosen for s in scores if s.family == "fvd"] == [False, True]
    assert [s.worst_ratio for s in scores if s.family == "fvd"] == [pytest.approx(10 / 3), pytest.approx(1.5)]


def test_images_round_trip_on_the_uint8_grid():
    images = (torch.randint(0, 256, (5, 1, 28, 28)).float() / 127.5) - 1.0
    assert torch.equal(decode_images(encode_images(images)), images)


# --- runs on the shipped zoo --------------------------------------------------------------

def test_smoke_run_of_the_command_writes_results_report_and_figures(tmp_path, mnist_data):
    from fvdiffusion.cli import app

    out = tmp_path / "bench"
    args = ["bench", "mnist", "--out", str(out), "--classes", "3", "--seeds", "1", "--samples-per-cell", "8",
            "--populations", "2", "--particles", "4", "--steps", "3", "--methods", "bon,smc-multinomial,smc-fk,fvd",
            "--svdd-candidates", "2", "--dts-rollouts", "1", "--scaling-steps", "2", "--solver-steps", "2",
            "--families", "fvd,smc-fk",
            "--grid-points", "2", "--tuning-classes", "3", "--tuning-samples", "8", "--bootstrap", "50",
            "--feature-spaces", "evalnet", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("results.jsonl", "results.md", "fid_vs_calls.png", "lineages.png", "samples_class3.png"):
        assert (out / name).is_file(), name
    rows = _read_rows(out / "results.jsonl")
    reported = {r["label"]: r for r in rows if r["seed"] == 1 and r["class"] == 3}
    assert {r["seed"] for r in rows} == {0, 1}
    report = (out / "results.md").read_text()
    for label in ("real (train)", "bon", "smc-multinomial", "smc-fk", "fvd", "fvd-tuned", "smc-fk-tuned", "svdd-M2",
                  "dts-R4", "smc-multinomial-K2", "fvd-K2", "fvd-dpmpp2m-K2"):
        assert f"| {label} |" in report, label
    assert "## A multistep solver at fewer steps" in report and "| fvd-dpmpp2m-K2 − fvd | evalnet |" in report
    assert "--solver-steps 2 " in report
    assert reported["fvd-dpmpp2m-K2"]["denoiser_calls"] == 2 * 4 * 2
    assert '"transition": "dpmpp_2m"' in reported["fvd-dpmpp2m-K2"]["resolved"]
    assert "| fvd − smc-fk |" in report and "## The claim" in report and "`evalnet` space" in report
    assert "--methods 'bon,smc-multinomial,smc-fk,fvd'" in report
    # two populations of N = 4 per cell; best-of-N keeps 2 of 4, so it needs 4 populations
    assert reported["fvd"]["populations"] == 2 and reported["bon"]["populations"] == 4
    assert reported["fvd"]["denoiser_calls"] == reported["smc-fk"]["denoiser_calls"] == 2 * 4 * 3
    pop = reported["fvd"]["per_population"][0]
    assert pop["n"] == 4 and 1 <= pop["distinct_roots"] <= pop["distinct_samples"] <= 4
    assert decode_images(pop["images"]).shape == (4, 1, 28, 28)

    # --report-only rebuilds the same report from the file and runs nothing
    before = (out / "results.jsonl").read_text()
    (out / "results.md").unlink()
    again = CliRunner().invoke(app, args + ["--report-only"])
    assert again.exit_code == 0, again.output
    assert (out / "results.jsonl").read_text() == before and (out / "results.md").read_text() == report


def test_an_interrupted_run_resumes_without_recomputing_finished_cells(tmp_path, mnist_data):
    cfg = _tiny(seeds=(1, 2))
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
    assert len(computed) == 3 and not set(computed) & set(first)  # 6 cells (real, base, fvd x 2 seeds), 3 not redone
    assert len(outcome.rows) == 6
    assert sorted(key(r) for r in _read_rows(tmp_path / "results.jsonl")) == sorted(first + computed)

    computed.clear()
    run_mnist_bench(cfg, tmp_path, progress_bar=False, on_cell=lambda row: computed.append(key(row)))
    assert computed == []


def test_a_run_without_images_reports_the_scores_it_stored(tmp_path, mnist_data):
    from fvdiffusion.bench.mnist import Scorer, summarise

    cfg = _tiny(rows=("smc-fk", "fvd"), store_images=False)
    outcome = run_mnist_bench(cfg, tmp_path, Scorer(cfg), progress_bar=False)
    rows = _read_rows(tmp_path / "results.jsonl")
    assert all("images" not in p for r in rows for p in r["per_population"])
    assert decode_images(rows[0]["preview"]).shape[1:] == (1, 28, 28)
    stored = {s.label: s for s in summarise(outcome, Scorer(cfg))}  # a fresh scorer reads the rows' scores
    with_images = run_mnist_bench(_tiny(rows=("smc-fk", "fvd")), tmp_path / "images", progress_bar=False)
    recomputed = {s.label: s for s in summarise(with_images, Scorer(cfg))}
    for label in ("real (train)", "smc-fk", "fvd"):
        a, b = stored[label].fid["evalnet"], recomputed[label].fid["evalnet"]
        assert (a.estimate, a.low, a.high) == pytest.approx((b.estimate, b.low, b.high), rel=1e-5)
    with pytest.raises(ValueError, match="bootstrap draws"):
        summarise(outcome, Scorer(_tiny(rows=("smc-fk", "fvd"), store_images=False, bootstrap=30)))


def test_worker_processes_compute_the_same_cells_as_one_process(tmp_path, mnist_data):
    strip = lambda rows: sorted((r["resolved"], r["seed"], json.dumps(r["per_population"])) for r in rows)
    one = run_mnist_bench(_tiny(rows=("fvd",)), tmp_path / "one", progress_bar=False)
    two = run_mnist_bench(_tiny(rows=("fvd",), workers=2), tmp_path / "two", progress_bar=False)
    assert len(one.rows) == 2 and strip(one.rows) == strip(two.rows)


def test_eta_reaches_every_sampler_config_and_the_cell_key():
    ddim = MnistBenchConfig.quick(eta=0.0)
    for label in ("smc-systematic", "fvd", "vasr", "bon-matched"):
        spec = next(r.spec for r in method_rows(ddim.n_particles, ddim.num_steps) if r.spec.label == label)
        assert sampler_config(spec, 1, ddim).eta == 0.0
        assert resolved(spec, 1, ddim) != resolved(spec, 1, MnistBenchConfig.quick())
    # FVD's defaults follow the sampler type (its kernel and allocation resolve per eta)
    fvd = MethodSpec("fvd", "fvd", {})
    assert sampler_config(fvd, 1, ddim).as_dict() != sampler_config(fvd, 1, MnistBenchConfig.quick()).as_dict()
    assert "--eta 0 " in reproduce_command(ddim, Path("o"))
    assert preset_name(MnistBenchConfig.preset("paper", eta=0.0)) == "paper"


def test_matched_best_of_n_pool_spends_fvd_cost():
    from fvdiffusion.bench.mnist.methods import REWARD_TO_DENOISER_COST, matched_bon_pool

    pool = matched_bon_pool(128, 50)
    rho = REWARD_TO_DENOISER_COST
    assert pool * (50 + rho) >= 128 * 50 * (1 + rho) > (pool - 1) * (50 + rho)
    spec = next(r.spec for r in method_rows(128, 50) if r.spec.label == "bon-matched")
    assert spec.options == {"n_particles": pool, "top_k": 64}


def test_tuning_only_runs_no_reported_cell(tmp_path):
    from fvdiffusion.bench.mnist.scoring import Scorer

    cfg = _tiny(tune=True, families=("vasr",), grid_points=2, tuning_classes=(7,), tuning_samples_per_cell=4)
    outcome = run_mnist_bench(cfg, tmp_path, Scorer(cfg), progress_bar=False, tuning_only=True)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"seed": 0' in line for line in lines)
    assert [t.chosen for t in outcome.tuning].count(True) == 1


def test_particle_sweep_rows_and_the_per_cell_sample_cap(tmp_path):
    from fvdiffusion.bench.mnist.methods import WALL_LABELS, samples_per_population
    from fvdiffusion.bench.mnist.scoring import Scorer

    cfg = _tiny(rows=(), particle_sizes=(2, 6), samples_per_cell=4, min_populations=1)
    sweep = [p for p in plan(cfg) if p.group == "wall"]
    assert [p.spec.label for p in sweep] == [f"{label}-N{n}" for n in (2, 6) for label in WALL_LABELS]
    by_label = {p.spec.label: p.spec for p in sweep}
    assert by_label["bon-N6"].options == {"top_k": 3, "n_particles": 6}
    assert sampler_config(by_label["fvd-N6"], 1, cfg).n_particles == 6
    assert samples_per_population(by_label["fvd-N6"], cfg) == 4      # capped at samples_per_cell
    assert samples_per_population(by_label["fvd-N2"], cfg) == 2
    outcome = run_mnist_bench(cfg, tmp_path, Scorer(cfg), progress_bar=False)
    rows = {r["label"]: r for r in outcome.rows}
    assert rows["fvd-N6"]["n_samples"] == 4 and rows["fvd-N6"]["populations"] == 1
    assert rows["fvd-N2"]["n_samples"] == 4 and rows["fvd-N2"]["populations"] == 2
    assert rows["fvd-N6"]["denoiser_calls"] == 6 * cfg.num_steps


# --- the multistep-solver rows (issue 20 item 6) ---------------------------------------------

def test_solver_rows_are_planned_only_when_asked_with_the_bench_eta():
    from fvdiffusion.bench.mnist.methods import estimated_calls, populations

    assert not [p for p in plan(_tiny()) if p.group == "solver"]
    cfg = _tiny(solver_steps=(2, 5))
    solver = [p for p in plan(cfg) if p.group == "solver"]
    assert [(p.spec.label, p.family, p.budget) for p in solver] == [("fvd-dpmpp2m-K2", "fvd-dpmpp2m", 2),
                                                                     ("fvd-dpmpp2m-K5", "fvd-dpmpp2m", 5)]
    assert solver[1].spec.method == "fvd" and solver[1].spec.options == {"num_steps": 5, "transition": "dpmpp_2m"}
    config = sampler_config(solver[1].spec, 1, cfg)
    assert (config.num_steps, config.transition, config.eta) == (5, "dpmpp_2m", 1.0)
    assert estimated_calls(solver[1].spec, cfg) == populations(solver[1].spec, cfg) * cfg.n_particles * 5
    # η = 0: the ODE solver, with FVD's defaults for a deterministic sampler (as the fvd row's)
    ode = _tiny(solver_steps=(2,), eta=0.0)
    spec = next(p.spec for p in plan(ode) if p.group == "solver")
    expected = sampler_config(MethodSpec("fvd", "fvd", {}), 1, ode).as_dict()
    expected.update(num_steps=2, transition="dpmpp_2m")
    assert sampler_config(spec, 1, ode).as_dict() == expected
    # UniPC, an ODE solver only, joins under η = 0 (and only then)
    assert [p.spec.label for p in plan(ode) if p.group == "solver"] == ["fvd-dpmpp2m-K2", "fvd-unipc-K2"]
    unipc = next(p for p in plan(ode) if p.spec.label == "fvd-unipc-K2")
    assert unipc.family == "fvd-unipc" and sampler_config(unipc.spec, 1, ode).transition == "unipc"


def test_solver_rows_leave_every_other_key_and_command_unchanged():
    paper = MnistBenchConfig.preset("paper")
    assert paper.solver_steps == (20,)
    assert all(MnistBenchConfig.preset(name).solver_steps == () for name in ("quick", "cpu", "wall", "gpu"))
    without = MnistBenchConfig.preset("paper", solver_steps=())
    old = {p.spec.label: resolved(p.spec, 1, without) for p in plan(without)}
    new = {p.spec.label: resolved(p.spec, 1, paper) for p in plan(paper)}
    assert set(new) - set(old) == {"fvd-dpmpp2m-K20"}
    assert all(new[label] == key for label, key in old.items())  # a results.jsonl of before resumes
    assert "transition" not in json.loads(old["fvd"]) and '"transition": "dpmpp_2m"' in new["fvd-dpmpp2m-K20"]
    assert reproduce_command(paper, Path("o")).startswith("fvd bench mnist --preset paper ")
    assert "--solver-steps 20 " in reproduce_command(MnistBenchConfig.preset("paper", seeds=(1,)), Path("o"))
    assert "--solver-steps" not in reproduce_command(_tiny(), Path("o"))


@pytest.mark.parametrize("value, needle", [("x", "--solver-steps"), ("2000", "--solver-steps"),
                                           ("1", "solver_steps"), ("20,20", "solver_steps")])
def test_a_bad_solver_steps_value_is_a_one_line_error(tmp_path, value, needle):
    from fvdiffusion.cli import app

    result = CliRunner().invoke(app, ["bench", "mnist", "--quick", "--solver-steps", value, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def _fake_outcome(cfg, fids):
    """Rows and a scorer for ``plan(cfg)`` without sampling: every cell of a label gets the FID of
    ``fids[label][space]``, with replicates that share one spread (so paired changes are tight)."""
    from fvdiffusion.bench.mnist.run import BenchOutcome
    from fvdiffusion.bench.mnist.scoring import CellScore

    spread = 1.0 + 0.01 * torch.linspace(-1, 1, cfg.bootstrap, dtype=torch.float64)
    planned = plan(cfg)
    rows = []
    for p in planned:
        for cls in cfg.classes:
            for seed in cfg.seeds:
                steps = p.spec.options.get("num_steps", cfg.num_steps)
                pops = [{"n": cfg.n_particles, "reward_mean": -0.1, "distinct_samples": 4,
                         "distinct_midpoint_ancestors": 2, "distinct_roots": 2, "slot_lineages": 2}] * 2
                rows.append({"label": p.spec.label, "class": cls, "seed": seed, "resolved": p.spec.label,
                             "per_population": pops, "genealogy": None, "device": "cpu", "threads": 1,
                             "denoiser_calls": 0 if p.group == "real" else 2 * cfg.n_particles * steps,
                             "reward_calls": 0, "wall_seconds": 1.0})

    def score(row):
        fid = fids[row["label"]]
        return CellScore(populations=2, accuracy=0.9, fid=dict(fid), kid={s: 0.01 for s in fid},
                         fid_replicates={s: v * spread for s, v in fid.items()},
                         kid_replicates={s: 0.01 * spread for s in fid})

    scorer = SimpleNamespace(spaces=("ae", "evalnet"), primary="ae", unavailable={}, score=score)
    return BenchOutcome(planned, rows, [], None), scorer


def test_the_solver_section_compares_each_solver_row_with_fvd():
    from fvdiffusion.bench.mnist import mnist_report

    cfg = _tiny(classes=(3, 7), seeds=(1, 2), rows=("fvd",), solver_steps=(2,))
    fids = {"real (train)": {"ae": 1.0, "evalnet": 1.0}, "fvd": {"ae": 10.0, "evalnet": 10.0},
            "fvd-dpmpp2m-K2": {"ae": 9.5, "evalnet": 12.0}}  # lower in ae; 20% higher in evalnet
    outcome, scorer = _fake_outcome(cfg, fids)
    report = mnist_report(outcome, cfg, scorer)
    section = report.split("## A multistep solver at fewer steps")[1].split("\n## ")[0]
    assert "| fvd-dpmpp2m-K2 − fvd | ae | 9.50 " in section
    assert "| fvd-dpmpp2m-K2 − fvd | evalnet | 12.00 " in section
    ae, evalnet = (line for line in section.splitlines() if line.startswith("| fvd-dpmpp2m-K2 − fvd |"))
    assert "-5.0 [" in ae and "| 4 / 0 / 0 |" in ae and ae.rstrip(" |").endswith("yes")
    assert "| 20.0 [" in evalnet and "| 0 / 4 / 0 |" in evalnet and evalnet.rstrip(" |").endswith("no")
    assert "| 2 | 3 | 33% |" in ae  # denoiser calls per sample: one per step, 2 vs 3 steps
    assert "- fvd-dpmpp2m-K2 (33% fewer denoiser calls per sample) does not match fvd in: `evalnet`" in section
    # the solver row sits in the quality tables of every space and in the diversity and cost table
    assert report.count("| fvd-dpmpp2m-K2 |") == 3
    # a run without solver rows has no such section
    plain = _tiny(classes=(3, 7), seeds=(1, 2), rows=("fvd",))
    outcome, scorer = _fake_outcome(plain, fids)
    assert "multistep solver" not in mnist_report(outcome, plain, scorer)


def test_solver_match_rule():
    from fvdiffusion.bench.common.paired_stats import Interval
    from fvdiffusion.bench.mnist.report import solver_matches

    assert solver_matches(Interval(-1.0, -5.0, 10.0)) and solver_matches(Interval(0.0, -3.0, 2.0))
    assert not solver_matches(Interval(-1.0, -5.0, 10.5))     # the data cannot rule out a >10% loss
    assert not solver_matches(Interval(0.5, -3.0, 4.0))      # FID higher
    assert not solver_matches(Interval(float("nan"), float("nan"), float("nan")))
