"""Population bootstrap statistics: grouped FID/KID equal the metrics on the pooled set, paired comparisons."""

import pytest
import torch

from fvdiffusion.bench.common.grouped_metrics import GroupedSet, Reference, fid, kid
from fvdiffusion.bench.common.paired_stats import (
    ClaimVerdict, Interval, mean_interval, paired_comparison, percentile_interval, resample_counts,
)


def _populations(shift: float, n_pop: int, size: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g, dtype=torch.float64) + shift for _ in range(n_pop)]


def _pooled(populations, counts):
    return torch.cat([p for p, c in zip(populations, counts.tolist()) for _ in range(c)])


def _brute_kid(ref, x, ids):
    """Unbiased MMD² over pairs of different samples (``ids`` name the original sample of each row)."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3
    m = ref.shape[0]
    different = ids[:, None] != ids[None, :]
    kyy = k(ref, ref)
    within_x = k(x, x)[different].mean()
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * k(x, ref).mean())


def test_resample_counts_draw_as_many_groups_as_there_are():
    counts = resample_counts(5, 200, torch.Generator().manual_seed(0))
    assert counts.shape == (200, 5) and (counts.sum(1) == 5).all() and (counts >= 0).all()
    assert (counts == 1).all(1).sum() < 200  # not the identity every time


def test_grouped_fid_equals_torchmetrics_fid_of_the_pooled_set_for_any_counts():
    from fvdiffusion.metrics.images import FeatureFID

    ref_feats = torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pops = _populations(0.3, 4, 20, 6, seed=2)
    reference = Reference.from_features(ref_feats)
    grouped = GroupedSet.from_populations(pops, reference)
    counts = torch.tensor([[1, 1, 1, 1], [2, 0, 1, 1], [0, 0, 4, 0]])
    values = fid(grouped, reference, counts)
    for row, value in zip(counts, values):
        assert float(value) == pytest.approx(FeatureFID(ref_feats)(_pooled(pops, row)), rel=1e-9, abs=1e-9)


def test_grouped_kid_is_the_unbiased_mmd_over_pairs_of_different_samples_for_any_counts():
    ref_feats = torch.randn(50, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pops = _populations(0.5, 3, 10, 5, seed=4)
    reference = Reference.from_features(ref_feats)
    grouped = GroupedSet.from_populations(pops, reference)
    counts = torch.tensor([[1, 1, 1], [3, 0, 0], [0, 2, 1]])
    values = kid(grouped, reference, counts)
    ids = [torch.arange(10) + 10 * p for p in range(3)]
    for row, value in zip(counts, values):
        expected = _brute_kid(ref_feats, _pooled(pops, row), _pooled(ids, row))
        assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_grouped_kid_equals_feature_kid_when_both_sets_have_the_subset_size():
    images = pytest.importorskip("fvdiffusion.metrics.images")
    if not hasattr(images, "FeatureKID"):
        pytest.skip("metrics.images has no FeatureKID yet")
    ref_feats = torch.randn(40, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pops = _populations(0.5, 4, 10, 5, seed=6)
    reference = Reference.from_features(ref_feats)
    value = kid(GroupedSet.from_populations(pops, reference), reference, torch.ones(1, 4, dtype=torch.int64))
    expected = images.FeatureKID(ref_feats, subset_size=40, num_subsets=1)(torch.cat(pops))
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _cell_fids(shift: float, cells: int, counts: torch.Tensor, ref_feats: torch.Tensor):
    """Points [C] and replicates [B, C] of one method over ``cells`` cells with shared bootstrap counts."""
    reference = Reference.from_features(ref_feats)
    points, reps = [], []
    for c in range(cells):
        grouped = GroupedSet.from_populations(_populations(shift, counts.shape[1], 24, 4, seed=100 + c), reference)
        points.append(float(fid(grouped, reference, grouped.all_once())))
        reps.append(fid(grouped, reference, counts))
    return torch.tensor(points), torch.stack(reps, dim=1)


def test_a_planted_better_method_gets_an_interval_below_zero_and_every_win():
    ref_feats = torch.randn(400, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    counts = resample_counts(8, 300, torch.Generator().manual_seed(8))
    better, better_reps = _cell_fids(0.05, 6, counts, ref_feats)
    worse, worse_reps = _cell_fids(0.6, 6, counts, ref_feats)
    result = paired_comparison(better, worse, better_reps, worse_reps)
    assert result.cells == 6 and result.wins == 6 and result.losses == 0
    assert result.change.high < 0 and result.change.excludes(0.0)
    assert result.significant_wins >= 5
    # the same comparison the other way round is a significant loss
    reverse = paired_comparison(worse, better, worse_reps, better_reps)
    assert reverse.change.low > 0 and reverse.losses == 6 and reverse.win_margin == -6


def test_identical_methods_tie_everywhere_with_a_zero_interval():
    ref_feats = torch.randn(200, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    counts = resample_counts(5, 100, torch.Generator().manual_seed(10))
    points, reps = _cell_fids(0.3, 4, counts, ref_feats)
    result = paired_comparison(points, points.clone(), reps, reps.clone())
    assert result.win_margin == 0 and result.ties == 4 and result.significant_wins == result.significant_losses == 0
    assert result.change == Interval(0.0, 0.0, 0.0)
    absolute = paired_comparison(points, points.clone(), reps, reps.clone(), relative=False)
    assert absolute.change == Interval(0.0, 0.0, 0.0) and not absolute.relative


def test_percentile_and_mean_intervals():
    reps = torch.arange(1001, dtype=torch.float64)  # 0 … 1000
    interval = percentile_interval(500.0, reps)
    assert interval.low == pytest.approx(25.0) and interval.high == pytest.approx(975.0)
    # draws shifted up by resampling keep their spread, centred on the estimate
    shifted = percentile_interval(500.0, reps + 300.0)
    assert shifted.low == pytest.approx(25.0) and shifted.high == pytest.approx(975.0)
    assert percentile_interval(1.0, torch.tensor([float("nan")])).low != percentile_interval(1.0, torch.tensor([1.0])).low
    m = mean_interval(torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 3.0], [2.0, 4.0], [0.0, 2.0]]))
    assert m.estimate == 2.0 and m.low == pytest.approx(1.05) and m.high == pytest.approx(2.95)
    with pytest.raises(ValueError, match="replicates"):
        mean_interval(torch.tensor([1.0]), torch.ones(3, 2))


@pytest.mark.parametrize("low, high, expected", [
    (-25.0, -21.0, "better than the claimed range"),
    (-19.0, -15.0, "inside the claimed range"),
    (-30.0, -5.0, "consistent with the claim"),
    (-12.0, -3.0, "not supported"),
    (-5.0, 8.0, "not significantly different; the claim is not supported"),
    (-25.0, 10.0, "not significantly different; too wide to decide"),
])
def test_claim_verdicts(low, high, expected):
    assert expected in ClaimVerdict(Interval((low + high) / 2, low, high), -20.0, -14.0).text


def test_relative_change_is_a_geometric_mean_so_opposite_ratios_cancel():
    method, baseline = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])  # x2 in one cell, /2 in the other
    result = paired_comparison(method, baseline, method.repeat(5, 1), baseline.repeat(5, 1))
    assert result.change.estimate == pytest.approx(0.0) and result.wins == result.losses == 1
    halved = paired_comparison(baseline / 2, baseline, (baseline / 2).repeat(5, 1), baseline.repeat(5, 1))
    assert halved.change.estimate == pytest.approx(-50.0) and halved.change.high == pytest.approx(-50.0)


def test_single_population_cells_get_an_interval_over_cells_not_a_zero_width_one():
    from fvdiffusion.bench.common.paired_stats import paired_comparison

    method = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.2, 0.9])
    baseline = torch.tensor([1.1, 1.5, 1.0, 2.0, 1.3, 1.0])
    # one population per cell: every bootstrap replicate of a cell is its point
    result = paired_comparison(method, baseline, method.expand(200, 6), baseline.expand(200, 6))
    assert result.change.low < result.change.estimate < result.change.high
    assert result.change.low < 0 < result.change.high          # mixed cells: no verdict
    better = paired_comparison(0.5 * baseline, baseline, (0.5 * baseline).expand(200, 6), baseline.expand(200, 6))
    assert better.change.high < 0 and better.wins == 6


def test_mean_interval_of_single_population_cells_resamples_the_cells():
    from fvdiffusion.bench.common.paired_stats import mean_interval

    points = torch.tensor([1.0, 3.0, 2.0, 6.0])
    interval = mean_interval(points, points.expand(500, 4))
    assert interval.low < 3.0 < interval.high and interval.high - interval.low > 1.0


def test_single_population_cells_with_rounding_noise_still_resample_cells_and_claim_no_per_cell_significance():
    from fvdiffusion.bench.common.paired_stats import paired_comparison

    method = torch.tensor([1.0, 2.0, 0.5, 3.0])
    baseline = torch.tensor([1.1, 1.5, 1.0, 2.0])
    wiggle = 1 + 1e-9 * torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    result = paired_comparison(method, baseline, method * wiggle, baseline * wiggle)
    assert result.change.high - result.change.low > 10.0        # percent: the cells differ a lot
    assert result.significant_wins is None and result.significant_losses is None
