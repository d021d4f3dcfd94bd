"""The feature spaces beyond the eval net: the autoencoder (``ae``) and the MLP judge (``mlp``).

The validation: a collapsed real set (4 real digits of a class repeated to 200 rows, tiny
pixel noise) must score far worse than a diverse real set of the same class and size
(200 disjoint real digits), both against the held-out reference digits of the class; so
must the jittered set (the collapsed rows moved by small random rotations, shifts and
scales: near-copies, not copies). In the ``mlp`` space FID must also rank a diverse set
before a collapsed one (8 digits repeated to 256 rows) before a diverse set of the wrong class.
"""

from __future__ import annotations

import hashlib
import re
import statistics

import pytest
import torch

from fvdiffusion.errors import DataMissingError, WeightsError, WeightsMissingError
from fvdiffusion.metrics.collapse_check import collapse_row, collapse_sets, ranking_row
from fvdiffusion.metrics.feature_spaces import FEATURE_SPACES, image_features
from fvdiffusion.train.checkpoint import load_checkpoint
from fvdiffusion.train.classifier import ClassifierTrainConfig, train_classifier
from fvdiffusion.train.feature_net import FeatureNetTrainConfig, train_feature_net
from fvdiffusion.zoo.classifiers import MlpClassifier, MlpClassifierConfig
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig
from fvdiffusion.zoo.loaders import default_path, load_feature_net, load_mlp_classifier, write_weights
from fvdiffusion.zoo.mnist_data import load_mnist
from tiny_models import interrupt_training_at

# collapsed / diverse and jittered / diverse; measured 10-28 and 7.1-16 in the 'ae' space,
# 2.4-10.5 and 1.5-8.0 with the eval net (docs/feature_space.md)
MIN_FID_RATIO = 5.0
# KID of a diverse real set against the reference is ~0 up to subset noise (|KID| <= 0.052 measured
# in the standardised 'ae' space); collapsed sets must clear three times this floor at least.
KID_FLOOR = 0.05
# the 'mlp' ranking check (8 digits repeated to 256 rows; docs/feature_space.md): collapsed / diverse
# measured 3.7-9.5 and wrong class / collapsed 4.9-27.7 over the ten classes
MLP_MIN_COLLAPSE_RATIO = 3.0  # the eval net: 2.5-9.6, under 3 for classes 0, 6 and 9
MLP_MIN_WRONG_CLASS_RATIO = 3.0


@pytest.fixture(scope="module")
def per_class_sets():
    try:
        load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")
    return [collapse_sets(cls) for cls in range(10)]


EVALNET_CLASSES = 4  # the eval net's features cost ~1.5 s a class on one thread: compare on classes 0-3


@pytest.fixture(scope="module")
def rows(per_class_sets):
    """Collapsed-vs-diverse scores, one row per class: every class in 'ae' and 'mlp', classes 0-3 in 'evalnet'."""
    return {"ae": [collapse_row(sets, "ae") for sets in per_class_sets],
            "mlp": [collapse_row(sets, "mlp") for sets in per_class_sets],
            "evalnet": [collapse_row(sets, "evalnet") for sets in per_class_sets[:EVALNET_CLASSES]]}


# --- the validation ---------------------------------------------------------------------

def test_ae_space_scores_a_collapsed_real_set_far_worse_than_a_diverse_one(rows):
    for row in rows["ae"]:
        assert min(row.fid_ratio, row.fid_ratio_jittered) >= MIN_FID_RATIO, row
        assert min(row.kid_collapsed, row.kid_jittered) >= 3 * max(row.kid_diverse, KID_FLOOR), row


def test_ae_space_sees_collapse_far_better_than_the_eval_net(rows):
    # the per-class ranges overlap a little (class 5), so compare medians over the same classes
    for ratio in ("fid_ratio", "fid_ratio_jittered"):
        median = {space: statistics.median(getattr(row, ratio) for row in rows[space][:EVALNET_CLASSES])
                  for space in ("ae", "evalnet")}
        assert median["ae"] >= 3 * median["evalnet"], (ratio, median)


def test_mlp_space_ranks_diverse_before_collapsed_before_the_wrong_class(per_class_sets):
    # per_class_sets: only for its skip when the MNIST data is missing
    for cls in range(10):
        row = ranking_row(cls, "mlp", n=256, distinct=8)
        assert row.ranked, row
        assert row.fid_collapsed >= MLP_MIN_COLLAPSE_RATIO * row.fid_diverse, row
        assert row.fid_wrong_class >= MLP_MIN_WRONG_CLASS_RATIO * row.fid_collapsed, row


def test_mlp_space_sees_collapse_better_than_the_eval_net(rows):
    for row in rows["mlp"]:  # KID too: measured collapsed 0.20-0.51 against |KID(diverse)| <= 0.035
        assert row.kid_collapsed >= 3 * max(row.kid_diverse, KID_FLOOR), row
    # medians over classes 0-3: collapsed 6.9 vs 3.75, jittered 6.7 vs 2.25 (docs/feature_space.md)
    for ratio in ("fid_ratio", "fid_ratio_jittered"):
        median = {space: statistics.median(getattr(row, ratio) for row in rows[space][:EVALNET_CLASSES])
                  for space in ("mlp", "evalnet")}
        assert median["mlp"] >= 1.5 * median["evalnet"], (ratio, median)


def test_collapse_sets_are_disjoint_and_really_collapsed(per_class_sets):
    sets = per_class_sets[3]
    assert sets.diverse.shape == sets.collapsed.shape == sets.jittered.shape == (200, 1, 28, 28)
    # 4 clusters of near-copies in the collapsed set, none of its digits in the diverse set
    distances = torch.cdist(sets.collapsed.flatten(1), sets.collapsed[:4].flatten(1))
    assert (distances.min(1).values < 1.0).all()
    assert torch.cdist(sets.collapsed[:4].flatten(1), sets.diverse.flatten(1)).min() > 1.0


# --- image_features -----------------------------------------------------------------------

def test_image_features_shapes_batching_and_clamping():
    images = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert set(FEATURE_SPACES) == {"evalnet", "ae", "mlp"}
    for space, dim in (("evalnet", 96), ("ae", 32), ("mlp", 128)):
        whole = image_features(images, space)
        assert whole.shape == (7, dim) and whole.dtype == torch.float64 and whole.device.type == "cpu"
        torch.testing.assert_close(whole, image_features(images, space, batch_size=3), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(image_features(images * 4, space), image_features((images * 4).clamp(-1, 1), space))
    assert image_features(images[:0], "ae").shape == (0, 32)
    assert image_features(images[:0], "mlp").shape == (0, 128)


@pytest.mark.parametrize("kwargs, field", [
    ({"space": "inception"}, "space"),
    ({"space": "ae", "batch_size": 0}, "batch_size"),
])
def test_image_features_name_the_bad_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        image_features(torch.zeros(2, 1, 28, 28), **kwargs)
    with pytest.raises(ValueError, match="images"):
        image_features(torch.zeros(2, 28, 28), "ae")


def test_ae_features_are_standardised_on_the_train_digits():
    try:
        train = load_mnist("train").images
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")
    feats = image_features(train, "ae")
    torch.testing.assert_close(feats.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(feats.std(0), torch.ones(32, dtype=torch.float64), atol=1e-3, rtol=0)


# --- the shipped weights ------------------------------------------------------------------

def test_shipped_feature_net_is_small_and_its_card_has_the_right_hash():
    path = default_path("feature_net")
    net = load_feature_net()
    assert isinstance(net, FeatureNet) and path.stat().st_size < 1_500_000
    card = path.with_suffix(".md").read_text()
    digest = re.search(r"SHA-256\*\* of `feature_net.safetensors`: `([0-9a-f]{64})`", card)
    assert digest and digest.group(1) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "fvd train features" in card


def test_shipped_mlp_classifier_is_small_unaugmented_and_its_card_has_the_right_hash():
    path = default_path("mlp_classifier")
    net = load_mlp_classifier()
    assert isinstance(net, MlpClassifier) and net.feature_dim == 128 and path.stat().st_size < 1_500_000
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d)) for m in net.modules())
    card = path.with_suffix(".md").read_text()
    digest = re.search(r"SHA-256\*\* of `mlp_classifier.safetensors`: `([0-9a-f]{64})`", card)
    assert digest and digest.group(1) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "fvd train classifier --kind mlp" in card and '"augment": false' in card
    assert "--seed 4 " in card  # not the reward classifier's 1, the eval net's 2 or the autoencoder's 3


def test_mlp_features_feed_its_logits():
    torch.manual_seed(0)
    net = MlpClassifier(MlpClassifierConfig(hidden1=16, hidden2=8)).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = net.features(x)
        assert feats.shape == (4, 8) and net.feature_dim == 8
        torch.testing.assert_close(net.fc(feats), net(x))


def test_mlp_recipe_is_never_augmented_and_resumes_exactly(tmp_path, monkeypatch):
    from fvdiffusion.train import resumable

    config = ClassifierTrainConfig.for_kind("mlp", steps=5, batch_size=4, warmup_steps=1)
    assert config.augment is False and config.seed == 4
    with pytest.raises(ValueError, match="augment must be False for kind 'mlp'"):
        ClassifierTrainConfig.for_kind("mlp", augment=True)
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen))
    interrupt_training_at(monkeypatch, 3)
    with pytest.raises(resumable.TrainingInterrupted, match="stopped at step 3"):
        train_classifier(config, tmp_path / "resumed", data, None, progress=False)
    monkeypatch.undo()
    train_classifier(config, tmp_path / "resumed", data, None, resume=True, progress=False)
    train_classifier(config, tmp_path / "straight", data, None, progress=False)
    resumed, straight = load_checkpoint(tmp_path / "resumed"), load_checkpoint(tmp_path / "straight")
    assert straight.meta["kind"] == "classifier/mlp" and straight.meta["config"]["augment"] is False
    assert resumed.model.keys() == straight.model.keys()
    assert all(torch.equal(resumed.model[k], straight.model[k]) for k in straight.model)
    assert not torch.equal(MlpClassifier().state_dict()["fc.weight"], straight.model["fc.weight"])


def test_mlp_run_exports_to_a_verified_file(tmp_path):
    from fvdiffusion.train.export import export_run
    from fvdiffusion.zoo.loaders import recorded_hash, sha256_of

    try:
        load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen))
    train_classifier(ClassifierTrainConfig.for_kind("mlp", steps=2, batch_size=4, warmup_steps=1), tmp_path / "run",
                     data, None, progress=False)
    result = export_run("mlp", tmp_path / "run", out_dir=tmp_path / "w")
    assert result.weights.name == "mlp_classifier.safetensors"
    assert recorded_hash(result.card) == sha256_of(result.weights)
    assert isinstance(load_mlp_classifier(result.weights), MlpClassifier)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["mlp_classifier.md", "mlp_classifier.safetensors"]


def test_missing_and_corrupt_feature_net_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(WeightsMissingError, match="none.safetensors") as err:
        load_feature_net(missing)
    assert "\n" not in str(err.value)
    torch.manual_seed(0)
    path = write_weights(FeatureNet(FeatureNetConfig(channels1=4, channels2=8, latent_dim=3)), "feature_net",
                         tmp_path / "small.safetensors")
    assert load_feature_net(path).feature_dim == 3
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="corrupted") as err:
        load_feature_net(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- the recipe ---------------------------------------------------------------------------

def test_feature_net_training_resumes_exactly_and_fits_the_feature_scale(tmp_path, monkeypatch):
    from fvdiffusion.train import resumable

    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = FeatureNetTrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=1,
                                   model=FeatureNetConfig(channels1=4, channels2=8, latent_dim=3))

    interrupt_training_at(monkeypatch, 3)  # Ctrl-C at step 3
    with pytest.raises(resumable.TrainingInterrupted, match="SIGINT: stopped at step 3"):
        train_feature_net(config, tmp_path / "resumed", images, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed").step == 3
    train_feature_net(config, tmp_path / "resumed", images, resume=True, progress=False)
    summary = train_feature_net(config, tmp_path / "straight", images, progress=False)
    resumed, straight = load_checkpoint(tmp_path / "resumed").model, load_checkpoint(tmp_path / "straight").model
    assert summary.step == 6 and summary.reference_mse is None
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    fresh = FeatureNet(config.model).state_dict()
    assert not torch.equal(fresh["encoder.0.weight"], straight["encoder.0.weight"])
    assert not torch.equal(fresh["feature_std"], straight["feature_std"])  # the scale was fitted
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_feature_net(config, tmp_path / "straight", images, progress=False)


def test_feature_net_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="latent_dim"):
        FeatureNetConfig(latent_dim=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        FeatureNetTrainConfig(steps=10, warmup_steps=10)


@pytest.mark.parametrize("args, message", [
    (["features", "--steps", "0"], "steps must be a positive int"),
    (["export", "--kind", "features", "--run", "no/such/run", "--out", "unused"], "no checkpoint"),
    (["classifier", "--kind", "mlp", "--steps", "0"], "steps must be a positive int"),
    (["export", "--kind", "mlp", "--run", "no/such/run", "--out", "unused"], "no checkpoint"),
])
def test_train_features_cli_reports_bad_arguments_in_one_line(args, message):
    import typer
    from typer.testing import CliRunner

    from fvdiffusion.cli.train import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
