"""The declared rule that picks FVD's defaults: images first, the exact suite as a gate."""

from __future__ import annotations

import json

import pytest

from fvdiffusion.bench import fvd_defaults
from fvdiffusion.bench.common.protocol import TUNING_SEED
from fvdiffusion.bench.mnist.config import MnistBenchConfig
from fvdiffusion.bench.mnist.methods import resolved, tuning_points
from fvdiffusion.bench.toy.suite import FVD_GRID, SUITE_PROBLEMS


def _write_tuning(path, eta, fid_of):
    """Tuning rows of the paper preset whose stored scores come from ``fid_of(family, index)``."""
    cfg = MnistBenchConfig.preset("paper", eta=eta)
    index: dict[str, int] = {}
    lines = []
    for point in tuning_points(cfg):
        i = index.get(point.family, 0)
        index[point.family] = i + 1
        for cls in cfg.tuning_classes:
            fid = fid_of(point.family, i)
            lines.append(json.dumps({
                "class": cls, "seed": TUNING_SEED, "resolved": resolved(point.spec, TUNING_SEED, cfg, tuning=True),
                "label": point.spec.label, "populations": 1, "denoiser_calls": 128 * 50,
                "scores": {"spaces": {"ae": {"fid": fid}, "evalnet": {"fid": fid}, "mlp": {"fid": 1e9}}}}))
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")


def _suite_rows(sampler, sw2_of):
    return [{"problem": p, "sampler": sampler, "label": f"fvd:{name}", "seed": TUNING_SEED, "sliced_w2": sw2_of(name, p)}
            for name in FVD_GRID for p in SUITE_PROBLEMS]


def test_the_best_image_point_wins_unless_the_suite_vetoes_it(tmp_path):
    # image ranking: point 4 (nu1 by copies, systematic) best, then point 2 (plain clones, systematic)
    order = {4: 1.0, 2: 1.1}
    _write_tuning(tmp_path / "ddpm", 1.0, lambda family, i: order.get(i, 2.0) if family == "fvd" else 3.0)
    fine = _suite_rows("ddpm", lambda name, p: 1.0)
    choice = fvd_defaults.choose_default(tmp_path / "ddpm", fine, "ddpm")
    assert choice.chosen.options == {"rebirth_noise": 1.0, "nu_by_copies": True, "parent_allocation": "systematic"}
    assert choice.chosen.suite_label == "nu1-copies-sys"
    # the suite vetoes nu1-copies-sys (4x the grid's best on one problem): the runner-up takes over
    vetoed = _suite_rows("ddpm", lambda name, p: 4.0 if (name, p) == ("nu1-copies-sys", SUITE_PROBLEMS[0]) else 1.0)
    choice = fvd_defaults.choose_default(tmp_path / "ddpm", vetoed, "ddpm")
    assert choice.chosen.suite_label == "nu0-sys"
    assert not choice.ranking[0].eligible and "fails the gate" in fvd_defaults.report([choice], "cmd")


def test_every_mnist_fvd_point_has_a_suite_twin_under_both_samplers():
    for sampler, eta in fvd_defaults.SAMPLER_ETA.items():
        suite = {json.dumps(fvd_defaults.kernel_of(o, eta), sort_keys=True) for o in FVD_GRID.values()}
        cfg = MnistBenchConfig.preset("paper", eta=eta)
        for point in tuning_points(cfg):
            if point.family == "fvd":
                assert json.dumps(fvd_defaults.kernel_of(point.spec.options, eta), sort_keys=True) in suite, point


def test_missing_tuning_cells_are_a_clear_error(tmp_path):
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="not all there"):
        fvd_defaults.choose_default(tmp_path / "ddpm", _suite_rows("ddpm", lambda n, p: 1.0), "ddpm")


def test_the_shipped_defaults_are_what_the_committed_results_choose():
    """samplers/fvd.py's constants must equal the rule's choice on the committed tuning results."""
    from pathlib import Path

    from fvdiffusion.samplers.fvd import FVDConfig

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    suite_rows = fvd_defaults.load_suite_rows(root / "suite_v2")
    for sampler, eta in fvd_defaults.SAMPLER_ETA.items():
        choice = fvd_defaults.choose_default(root / "mnist_paper" / sampler, suite_rows, sampler)
        shipped = FVDConfig(eta=eta).as_dict()
        chosen = fvd_defaults.kernel_of(choice.chosen.options, eta)
        assert {k: shipped[k] for k in fvd_defaults.KERNEL_FIELDS} == chosen, sampler
