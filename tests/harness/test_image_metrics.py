import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fvdiffusion.metrics.images import (
    FeatureFID, FeatureKID, _PassThrough, accuracy, features_and_logits, fid, image_set_metrics, kid,
    mean_pairwise_distance, vendi_score,
)
from fvdiffusion.zoo.classifiers import EvalNet, EvalNetConfig


def _gaussian_set(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing


def _scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """An independent reference: ||Δμ||² + tr(Σa + Σb − 2 (Σa Σb)^½) with scipy's sqrtm."""
    a, b = a.numpy(), b.numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_fid_of_a_set_with_itself_is_zero():
    x = _gaussian_set(400, 16, seed=0)
    assert abs(fid(x, x)) < 1e-6


def test_fid_of_a_shifted_set_is_the_squared_shift():
    x = _gaussian_set(300, 8, seed=1)
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    assert fid(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)


def test_fid_grows_with_the_amount_of_added_noise():
    x = _gaussian_set(500, 12, seed=2)
    noise = torch.randn(500, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores = [fid(x, x + s * noise) for s in (0.0, 0.1, 0.3, 1.0)]
    assert scores[0] < 1e-6
    assert all(lo < hi for lo, hi in zip(scores, scores[1:])), scores


def test_fid_matches_an_independent_scipy_computation():
    a = _gaussian_set(250, 10, seed=4)
    b = _gaussian_set(180, 10, seed=5, scale=1.5) + 0.3
    assert fid(a, b) == pytest.approx(_scipy_fid(a, b), rel=1e-6)


def test_fid_is_finite_when_the_sample_set_has_fewer_rows_than_dimensions():
    # the benchmark's quick setting: 64 samples in a 96-d feature space (rank-deficient covariance)
    ref = _gaussian_set(200, 96, seed=6)
    fake = _gaussian_set(64, 96, seed=7)
    score = fid(ref, fake)
    assert math.isfinite(score) and score > 0
    assert score == pytest.approx(_scipy_fid(ref, fake), rel=1e-4)


def test_feature_fid_reuses_the_reference_across_calls():
    ref = _gaussian_set(300, 6, seed=8)
    scorer = FeatureFID(ref)
    a, b = _gaussian_set(100, 6, seed=9), _gaussian_set(100, 6, seed=10) + 1.0
    first = scorer(a)
    assert scorer(b) == pytest.approx(fid(ref, b), rel=1e-9)
    assert scorer(a) == pytest.approx(first, rel=1e-9)  # the previous set left no trace


def test_fid_rejects_bad_inputs():
    ref = _gaussian_set(50, 4, seed=11)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid(ref, ref[:1])
    with pytest.raises(ValueError, match="dimension 3"):
        fid(ref, ref[:, :3])
    bad = ref.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fid(ref, bad)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_when_the_subset_covers_both_sets():
    # with subset size = n for two sets of n rows, every subset is the whole set, so the
    # subset mean is the full unbiased MMD² whatever the random draws
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _gaussian_set(60, 5, seed=20), _gaussian_set(60, 5, seed=21, scale=1.3) + 0.2
    reference = KernelInceptionDistance(feature=_PassThrough(5), subsets=3, subset_size=60)
    reference.update(a, real=True)
    reference.update(b, real=False)
    expected = float(reference.compute()[0])
    score = FeatureKID(a, subset_size=60, num_subsets=3).score(b)
    assert score.mean == pytest.approx(expected, rel=1e-9) and score.std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    mixing = torch.randn(8, 8, generator=torch.Generator().manual_seed(22), dtype=torch.float64) / math.sqrt(8)

    def draw(seed: int) -> torch.Tensor:
        return torch.randn(400, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mixing

    ref, fresh = draw(23), draw(24)
    scores = [kid(ref, fresh + s) for s in (0.0, 0.3, 1.0)]
    assert abs(scores[0]) < 0.1 * scores[1] and scores[1] < scores[2], scores


def test_kid_adapts_the_subset_size_to_small_sets_and_is_deterministic():
    ref = _gaussian_set(50, 4, seed=24)
    scorer = FeatureKID(ref)  # default subset size 1000 > both sets
    small = _gaussian_set(12, 4, seed=25)
    score = scorer.score(small)
    assert score.subset_size == 12 and score.num_subsets == 100 and score.std > 0
    assert scorer(small) == score.mean == FeatureKID(ref).score(small).mean
    assert FeatureKID(ref, seed=1).score(small).mean != score.mean  # the seed picks the subsets


def test_kid_rejects_bad_inputs():
    ref = _gaussian_set(30, 4, seed=26)
    with pytest.raises(ValueError, match="subset_size"):
        FeatureKID(ref, subset_size=1)
    with pytest.raises(ValueError, match="num_subsets"):
        FeatureKID(ref, num_subsets=0)
    with pytest.raises(ValueError, match="dimension 3"):
        kid(ref, ref[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(ref, ref[:1])


def test_vendi_of_identical_samples_is_one_and_of_orthogonal_samples_is_n():
    row = torch.tensor([[0.5, -2.0, 1.0]], dtype=torch.float64)
    assert vendi_score(row.repeat(10, 1)) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(torch.eye(7, dtype=torch.float64) * 3.0) == pytest.approx(7.0, rel=1e-9)


def test_vendi_counts_clusters_and_ignores_scale():
    # two orthogonal directions, 5 copies each (with different lengths): two effective samples
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    x = torch.stack([e1 * (i + 1) for i in range(5)] + [e2 * (i + 1) for i in range(5)])
    assert vendi_score(x) == pytest.approx(2.0, rel=1e-9)
    y = _gaussian_set(40, 8, seed=12)
    assert vendi_score(y) == pytest.approx(vendi_score(3.0 * y), rel=1e-9)
    assert 1.0 < vendi_score(y) <= 40.0


def test_mean_pairwise_distance_on_a_known_example():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx((1 + 3 + 2) / 3)
    assert mean_pairwise_distance(x[:1].repeat(4, 1)) == 0.0


def test_accuracy_counts_argmax_hits_and_validates_the_class():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.1, 0.0, 0.2]])
    assert accuracy(logits, 0) == pytest.approx(0.5)
    assert accuracy(logits, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="target_class"):
        accuracy(logits, 3)


def test_features_and_logits_do_not_depend_on_the_micro_batch_and_clamp_inputs():
    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(widths=(8, 8, 16), blocks_per_stage=1, num_groups=4)).eval()
    images = torch.rand(7, 1, 28, 28) * 2 - 1
    f_all, l_all = features_and_logits(net, images)
    f_mb, l_mb = features_and_logits(net, images, batch_size=3)
    assert f_all.shape == (7, 16) and l_all.shape == (7, 10) and f_all.dtype == torch.float64
    torch.testing.assert_close(f_all, f_mb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_all, l_mb, rtol=1e-5, atol=1e-6)
    f_over, _ = features_and_logits(net, images * 5)
    f_clamped, _ = features_and_logits(net, (images * 5).clamp(-1, 1))
    torch.testing.assert_close(f_over, f_clamped)


def test_image_set_metrics_bundles_every_metric():
    ref = _gaussian_set(120, 5, seed=13)
    feats = _gaussian_set(30, 5, seed=14)
    logits = torch.zeros(30, 10)
    logits[:20, 4] = 1.0
    m = image_set_metrics(feats, logits, 4, FeatureFID(ref))
    assert m.accuracy == pytest.approx(20 / 30)
    assert m.fid == pytest.approx(fid(ref, feats))
    assert m.vendi == pytest.approx(vendi_score(feats)) and m.pairwise_distance > 0
