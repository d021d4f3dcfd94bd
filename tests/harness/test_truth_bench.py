"""``fvd bench truth``: the SNIS reference, its resumable job, the comparison and the command.

The estimator is checked against closed forms, the comparison against samplers whose bias is
known (exact mixture denoiser, fast), and the command end to end at --quick size on the shipped
MNIST DDPM (seconds).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import fvdiffusion as fv
from fvdiffusion.bench.common.methods import MethodSpec
from fvdiffusion.bench.truth import reference as reference_module
from fvdiffusion.bench.truth.compare import Population, run_compare
from fvdiffusion.bench.truth.config import CompareConfig, ReferenceConfig
from fvdiffusion.bench.truth.reference import base_path, load_base, run_reference
from fvdiffusion.bench.truth.scoring import Reference, score_all
from fvdiffusion.bench.truth.snis import bootstrap_means, snis
from fvdiffusion.bench.truth.statistics import MnistStatistics
from fvdiffusion.bench.truth.testbed import MeanInk, toy_testbed
from fvdiffusion.cli import app

runner = CliRunner()
TOY_STEPS = 10
TOY_LAM = 0.8   # moves the reward mean by about 0.7 base std on gmm2d-linear, ESS about 0.65 n


# --- the estimator ---------------------------------------------------------------------------------

def _gaussian_pair(n: int, seed: int, mu=(1.0, -2.0), sigma=(0.5, 2.0), rho=0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    s1 = mu[0] + sigma[0] * z[:, 0]
    s2 = mu[1] + sigma[1] * (rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1])
    return torch.stack([s1, s2], 1)


def test_snis_recovers_the_gaussian_tilt_in_closed_form():
    """r = s1 ~ N(μ, σ²) tilted by exp(λ r): s1 -> N(μ + λσ², σ²), s2 shifts by λ Cov(s1, s2), ESS/n -> exp(−λ²σ²)."""
    lam, n = 1.5, 400_000
    s = _gaussian_pair(n, seed=1)
    m = snis(s, lam * s[:, 0], ("s1", "s2"), lam)
    exact_mean = torch.tensor([1.0 + lam * 0.25, -2.0 + lam * 0.6 * 0.5 * 2.0], dtype=torch.float64)
    assert ((m.mean - exact_mean).abs() < 4 * m.se).all(), (m.mean, exact_mean, m.se)
    assert float(m.std[0]) == pytest.approx(0.5, rel=0.01)
    assert m.ess / n == pytest.approx(math.exp(-(lam * 0.5) ** 2), rel=0.03)
    assert float(m.shift()[0]) == pytest.approx(lam * 0.5, abs=0.01)  # λσ base stds
    untilted = snis(s, torch.zeros(n, dtype=torch.float64), ("s1", "s2"), 0.0)
    assert untilted.ess == pytest.approx(n) and torch.allclose(untilted.mean, s.mean(0))


def test_snis_standard_errors_are_calibrated_and_the_bootstrap_agrees():
    lam, n, repeats = 1.5, 2000, 300
    exact = 1.0 + lam * 0.25
    z = []
    for seed in range(repeats):
        s = _gaussian_pair(n, seed=100 + seed)
        m = snis(s, lam * s[:, 0], ("s1", "s2"), lam)
        z.append(float((m.mean[0] - exact) / m.se[0]))
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.2 and 0.85 < float(z.std()) < 1.15
    s = _gaussian_pair(n, seed=7)
    m = snis(s, lam * s[:, 0], ("s1", "s2"), lam)
    reps = bootstrap_means(s, lam * s[:, 0], 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(reps.std(0), m.se, rtol=0.15)


def test_snis_refuses_non_finite_inputs():
    s = _gaussian_pair(10, seed=0)
    with pytest.raises(ValueError, match="log-weights"):
        snis(s, torch.tensor([float("nan")] + [0.0] * 9), ("a", "b"), 1.0)
    s[3, 1] = float("inf")
    with pytest.raises(ValueError, match="statistic.*b"):
        snis(s, torch.zeros(10), ("a", "b"), 1.0)


# --- the statistics ----------------------------------------------------------------------------------

def test_the_reward_is_the_mean_ink_statistic_and_the_centroid_finds_the_ink():
    stats = MnistStatistics()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    values = stats(x)
    assert values.shape == (5, len(stats.names)) and values.dtype == torch.float64
    assert torch.allclose(values[:, stats.names.index("mean_ink")], MeanInk()(x).double(), atol=1e-6)
    assert torch.equal(values, stats(x.clone()))  # deterministic
    dot = -torch.ones(1, 1, 28, 28)
    dot[0, 0, 5, 20] = 1.0   # one inked pixel at row 5, column 20
    one = dict(zip(stats.names, stats(dot)[0].tolist()))
    assert one["centroid_row"] == pytest.approx(5.0) and one["centroid_col"] == pytest.approx(20.0)
    assert one["ink_spread"] == pytest.approx(0.0, abs=1e-6)
    assert one["top_half_ink"] == pytest.approx(1 / (14 * 28)) and one["left_half_ink"] == 0.0


# --- the resumable reference job -----------------------------------------------------------------------

def test_the_reference_job_resumes_after_a_kill_without_recomputing_rows(tmp_path, monkeypatch):
    testbed = toy_testbed("gmm2d-linear")
    cfg = ReferenceConfig("ddpm", steps=TOY_STEPS, base_samples=950, shard_size=100)  # 10 shards, the last of 50
    drawn: list[int] = []
    real = reference_module.run_shard

    def killed_after_three(tb, c, index):
        if len(drawn) == 3:
            raise KeyboardInterrupt("killed")
        drawn.append(index)
        return real(tb, c, index)

    monkeypatch.setattr(reference_module, "run_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_reference(testbed, cfg, tmp_path, progress_bar=False)
    path = base_path(tmp_path, "ddpm")
    first = path.read_bytes()
    assert first.count(b"\n") == 3 and load_base(testbed, cfg, tmp_path).shards_done == 3
    with path.open("ab") as fh:  # a kill in the middle of writing the 4th row leaves a torn line
        fh.write(first.splitlines()[0][:500])
    assert load_base(testbed, cfg, tmp_path).shards_done == 3  # a reader skips it and changes nothing

    drawn.clear()
    monkeypatch.setattr(reference_module, "run_shard", lambda tb, c, index: drawn.append(index) or real(tb, c, index))
    base = run_reference(testbed, cfg, tmp_path, progress_bar=False)
    assert drawn == list(range(3, 10))   # only the missing shards ran
    assert path.read_bytes().startswith(first)  # the first rows untouched, the torn line cut off
    assert base.complete and base.n == 950
    for line in path.read_text().splitlines():
        json.loads(line)
    fresh = run_reference(testbed, cfg, tmp_path / "fresh", progress_bar=False)
    assert torch.equal(fresh.stats, base.stats)   # the interrupted job drew exactly the uninterrupted sample
    drawn.clear()
    run_reference(testbed, cfg, tmp_path, progress_bar=False)
    assert drawn == []


def test_shards_have_distinct_seeds_and_a_larger_sample_reuses_them(tmp_path):
    testbed = toy_testbed("gmm2d-linear")
    small = run_reference(testbed, ReferenceConfig("ddim", steps=3, base_samples=200, shard_size=100), tmp_path,
                          progress_bar=False)
    large = run_reference(testbed, ReferenceConfig("ddim", steps=3, base_samples=300, shard_size=100), tmp_path,
                          progress_bar=False)
    assert torch.equal(large.stats[:200], small.stats)
    rows = [json.loads(line) for line in base_path(tmp_path, "ddim").read_text().splitlines()]
    assert len(rows) == 3 and len({row["seed"] for row in rows}) == 3 and all(row["seed"] >= 1_000_000 for row in rows)
    assert not torch.equal(large.stats[:100], large.stats[100:200])


# --- the comparison catches a biased sampler --------------------------------------------------------------

def _resampled_runner(pool: int = 2048):
    """Populations that are importance resamples of fresh base samples with λ' = factor · λ: factor 1 is an
    (asymptotically) exact draw from the tilt, 0 the untilted sampler, 2 a tilt twice too strong."""
    factors = {"snis-resampled": 1.0, "no-tilt": 0.0, "double-tilt": 2.0}

    def run(testbed, spec, cfg, seed):
        x = fv.sample("base", testbed.denoiser, None, n_particles=pool, num_steps=cfg.steps, eta=cfg.eta,
                      seed=seed).samples
        r = testbed.reward(x).double()
        g = torch.Generator().manual_seed(seed)
        pick = torch.multinomial(torch.softmax(factors[spec.label] * cfg.lam * r, 0), cfg.n_particles,
                                 replacement=True, generator=g)
        return Population(x[pick], torch.zeros(cfg.n_particles), pool * cfg.steps, 0, int(pick.unique().numel()))

    return run


def test_a_deliberately_biased_sampler_is_flagged_and_the_exact_one_is_not(tmp_path):
    testbed = toy_testbed("gmm2d-linear")
    ref_cfg = ReferenceConfig("ddpm", steps=TOY_STEPS, base_samples=20_000, shard_size=5000)
    base = run_reference(testbed, ref_cfg, tmp_path, progress_bar=False)
    reference = Reference.build(base.stats, testbed.names, "reward", TOY_LAM, n_boot=1000)
    assert reference.moments.ess >= 2000 and float(reference.moments.shift()[0]) > 0.5
    specs = tuple(MethodSpec(label, "base") for label in ("snis-resampled", "no-tilt", "double-tilt"))
    cmp_cfg = CompareConfig("ddpm", steps=TOY_STEPS, lam=TOY_LAM, n_particles=128, seeds=tuple(range(1, 13)),
                            methods=specs)
    rows = run_compare(testbed, cmp_cfg, tmp_path, runner=_resampled_runner(), progress_bar=False)
    assert len(rows) == 3 * 12
    scores = {s.label: s for s in score_all(rows, [s.label for s in specs], reference, 1000)}
    exact, none, double = scores["snis-resampled"], scores["no-tilt"], scores["double-tilt"]
    assert none.errors["reward"].high < 0 and "reward" in none.flagged          # too little tilt: below
    assert double.errors["reward"].low > 0 and "reward" in double.flagged       # too much: above
    assert not exact.errors["reward"].excludes(0.0) and len(exact.flagged) <= 1
    assert exact.rms.estimate < 0.5 * min(none.rms.estimate, double.rms.estimate)
    assert none.rms.low > none.noise_rms and exact.rms.estimate < 2 * exact.noise_rms


def test_the_comparison_resumes_and_reruns_only_a_changed_method(tmp_path):
    testbed = toy_testbed("gmm2d-linear")
    calls: list[tuple[str, int]] = []
    run = _resampled_runner(pool=256)

    def counting(tb, spec, cfg, seed):
        calls.append((spec.label, seed))
        return run(tb, spec, cfg, seed)

    cfg = CompareConfig("ddpm", steps=3, lam=TOY_LAM, n_particles=16, seeds=(1, 2),
                        methods=(MethodSpec("no-tilt", "base"), MethodSpec("snis-resampled", "base")))
    run_compare(testbed, cfg, tmp_path, runner=counting, progress_bar=False)
    assert len(calls) == 4
    calls.clear()
    run_compare(testbed, cfg, tmp_path, runner=counting, progress_bar=False)
    assert calls == []
    changed = CompareConfig("ddpm", steps=3, lam=TOY_LAM, n_particles=16, seeds=(1, 2),
                            methods=(MethodSpec("no-tilt", "base"), MethodSpec("snis-resampled", "bon")))
    rows = run_compare(testbed, changed, tmp_path, runner=counting, progress_bar=False)
    assert calls == [("snis-resampled", 1), ("snis-resampled", 2)]  # its resolved config changed, nothing else
    assert len(rows) == 4


def test_the_tuning_seed_is_refused():
    with pytest.raises(ValueError, match="tuning seed"):
        CompareConfig("ddpm", seeds=(0, 1))


# --- the command ----------------------------------------------------------------------------------------------

def _lines(path):
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
            for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("truth") / "out"
    for stage in ("reference", "compare"):
        result = runner.invoke(app, ["bench", "truth", "--stage", stage, "--quick", "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
    return out


def test_quick_writes_both_stages_for_both_samplers(quick):
    from fvdiffusion.bench.truth.config import METHODS, QUICK

    for sampler in ("ddpm", "ddim"):
        rows = _lines(quick / f"base_{sampler}.jsonl")
        assert len(rows) == QUICK["base_samples"] // QUICK["shard_size"]
        assert all(len(row["values"]["mean_ink"]) == QUICK["shard_size"] and row["steps"] == QUICK["steps"]
                   for row in rows)
    rows = _lines(quick / "results.jsonl")
    assert len(rows) == 2 * len(METHODS) * QUICK["populations"]
    assert {row["seed"] for row in rows} == {1, 2} and {row["label"] for row in rows} == set(METHODS)
    report = (quick / "results.md").read_text()
    for heading in ("## Reference (sampler floor), ddpm", "## Reference (sampler floor), ddim",
                    "## Methods against the reference, ddpm", "## Methods against the reference, ddim"):
        assert heading in report
    assert "fvd bench truth --stage reference --sampler both --quick" in report
    assert "snis-reference" in report and "fvd-nu0" in report
    reference = json.loads((quick / "reference.json").read_text(),
                           parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert set(reference["samplers"]) == {"ddpm", "ddim"}
    assert reference["samplers"]["ddpm"]["n"] == QUICK["base_samples"]


def test_quick_rerun_recomputes_nothing(quick):
    before = {p.name: p.read_bytes() for p in quick.glob("*.jsonl")}
    for stage in ("reference", "compare", "report"):
        result = runner.invoke(app, ["bench", "truth", "--stage", stage, "--quick", "--out", str(quick),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in quick.glob("*.jsonl")} == before


@pytest.mark.parametrize("argv, needle", [
    (["--stage", "bogus"], "--stage"),
    (["--stage", "reference", "--sampler", "ddpn"], "--sampler"),
    (["--stage", "reference", "--steps", "0"], "--steps"),
    (["--stage", "reference", "--steps", "5000"], "--steps"),
    (["--stage", "reference", "--base-samples", "1"], "--base-samples"),
    (["--stage", "reference", "--shard-size", "0"], "--shard-size"),
    (["--stage", "compare", "--lam", "nan"], "--lam"),
    (["--stage", "compare", "--lam", "-1"], "--lam"),
    (["--stage", "compare", "--particles", "1"], "--particles"),
    (["--stage", "compare", "--populations", "0"], "--populations"),
    (["--stage", "compare", "--methods", "fvdd"], "did you mean 'fvd'"),
    (["--stage", "compare", "--methods", ","], "--methods"),
    (["--stage", "compare", "--methods", "base,base"], "--methods"),
    (["--stage", "compare", "--bootstrap", "1"], "--bootstrap"),
    (["--stage", "compare", "--device", "tpu"], "--device"),
    (["--stage", "compare", "--threads", "0"], "--threads"),
    (["--stage", "reference", "--shard-size", str(10**12)], "--shard-size"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, argv, needle, monkeypatch):
    import fvdiffusion.bench.truth.testbed as testbed_module

    monkeypatch.setattr(testbed_module, "mnist_testbed", lambda *a, **k: pytest.fail("validation let it through"))
    result = runner.invoke(app, ["bench", "truth", "--out", str(tmp_path / "out"), "--no-progress", *argv])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_an_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    result = runner.invoke(app, ["bench", "truth", "--stage", "report", "--out", str(target)])
    assert result.exit_code == 2 and "--out" in result.stderr
