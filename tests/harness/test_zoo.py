"""The model zoo: networks, shipped weights and their loaders, the classifier reward, training resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvdiffusion.denoisers.base import ModuleDenoiser
from fvdiffusion.errors import DataMissingError
from fvdiffusion.rewards.classifier import ClassifierReward
from fvdiffusion.train.checkpoint import load_checkpoint
from fvdiffusion.train.classifier import ClassifierTrainConfig, accuracy, train_classifier
from fvdiffusion.train.ddpm import DDPMTrainConfig, train_ddpm
from fvdiffusion.train.quality import ddpm_quality, sample_ddpm
from fvdiffusion.zoo.classifiers import EvalNet, MlpClassifier, RewardClassifier
from fvdiffusion.zoo.loaders import (
    WeightsError,
    WeightsMissingError,
    default_path,
    load_ddpm,
    load_eval_net,
    load_mlp_classifier,
    load_module,
    load_reward_classifier,
    write_weights,
)
from fvdiffusion.zoo.mnist_data import load_mnist
from fvdiffusion.zoo.unet import UNet, UNetConfig
from tiny_models import TINY_UNET, interrupt_training_at



def _reference_or_skip():
    try:
        return load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")


# --- networks ---------------------------------------------------------------------------

def test_unet_predicts_the_input_shape_and_broadcasts_a_scalar_t():
    torch.manual_seed(0)
    unet = UNet(UNetConfig()).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = unet(x, torch.tensor([0, 500, 999]))
        # the zero-initialised head must be trained away, so perturb it to see t matter
        unet.head[-1].weight.normal_()
        a, b = unet(x, torch.tensor(10)), unet(x, torch.full((3,), 10))
        c = unet(x, torch.full((3,), 900))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_unet_default_size_stays_small():
    n = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    assert n <= 2_000_000


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="base_channels"):
        UNetConfig(base_channels=0)
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        DDPMTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="kind"):
        ClassifierTrainConfig(kind="judge")


def test_eval_net_features_feed_its_logits():
    torch.manual_seed(0)
    net = EvalNet().eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = net.features(x)
        assert feats.shape == (4, net.feature_dim)
        assert torch.allclose(net.fc(feats), net(x))


# --- loaders ----------------------------------------------------------------------------

def test_shipped_weights_load_offline():
    ddpm = load_ddpm()
    assert isinstance(ddpm, ModuleDenoiser)
    assert ddpm.prediction_type == "eps" and ddpm.sample_shape == (1, 28, 28)
    assert ddpm.schedule.num_train_timesteps == 1000
    x = torch.randn(2, 1, 28, 28)
    assert ddpm(x, torch.tensor([999, 0])).shape == x.shape
    assert isinstance(load_reward_classifier(), RewardClassifier)
    assert isinstance(load_eval_net(), EvalNet)
    assert isinstance(load_mlp_classifier(), MlpClassifier)
    total = sum(default_path(k).stat().st_size for k in ("ddpm", "reward_classifier", "eval_net", "mlp_classifier"))
    assert total < 10_000_000


def test_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsMissingError) as err:
        load_eval_net(missing)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def small_reward_file(tmp_path) -> Path:
    torch.manual_seed(0)
    return write_weights(RewardClassifier(), "reward_classifier", tmp_path / "reward.safetensors")


def test_round_trip_and_fp16(small_reward_file, tmp_path):
    torch.manual_seed(0)
    original = RewardClassifier().eval()
    loaded = load_reward_classifier(small_reward_file)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded(x), original(x).detach())
    half = write_weights(original, "reward_classifier", tmp_path / "half.safetensors", fp16=True)
    assert half.stat().st_size < 0.6 * small_reward_file.stat().st_size
    assert torch.allclose(load_reward_classifier(half)(x), original(x).detach(), atol=1e-2)


def test_truncated_file_is_reported(small_reward_file):
    data = small_reward_file.read_bytes()
    small_reward_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupted") as err:
        load_reward_classifier(small_reward_file)
    assert str(small_reward_file) in str(err.value) and "\n" not in str(err.value)


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_eval_net(path)


def _rewrite(path: Path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(path))
    edit(tensors, header)
    save_file(tensors, str(path), metadata=header)


def test_wrong_keys_are_reported(small_reward_file):
    _rewrite(small_reward_file, lambda t, h: t.update({"extra.weight": t.pop("head.2.weight")}))
    with pytest.raises(WeightsError, match=r"wrong keys \(missing head.2.weight, unexpected extra.weight\)"):
        load_reward_classifier(small_reward_file)


def test_wrong_shapes_are_reported(small_reward_file):
    _rewrite(small_reward_file, lambda t, h: t.update({"head.5.bias": torch.zeros(7)}))
    with pytest.raises(WeightsError, match=r"head.5.bias has shape \(7,\), expected \(10,\)"):
        load_reward_classifier(small_reward_file)


def test_wrong_kind_and_non_finite_are_reported(small_reward_file):
    with pytest.raises(WeightsError, match="holds a 'reward_classifier' network, expected 'eval_net'"):
        load_eval_net(small_reward_file)
    _rewrite(small_reward_file, lambda t, h: t["head.5.bias"].fill_(float("nan")))
    with pytest.raises(WeightsError, match="NaN"):
        load_reward_classifier(small_reward_file)


# --- shipped classifiers on held-out digits ---------------------------------------------

# the MLP judge (no convolution, no augmentation) measured 0.9683; the CNNs 0.9861 and 0.9901
@pytest.mark.parametrize("kind, bar", [("reward_classifier", 0.98), ("eval_net", 0.98), ("mlp_classifier", 0.96)])
def test_shipped_classifier_accuracy_on_reference(kind, bar):
    reference = _reference_or_skip()
    acc = accuracy(load_module(kind), reference.images, reference.labels)
    assert acc >= bar, f"{kind}: reference accuracy {acc:.4f} < {bar}"


# --- classifier reward ------------------------------------------------------------------

def test_classifier_reward_is_a_clamped_log_probability():
    torch.manual_seed(0)
    classifier = RewardClassifier().eval()
    x = torch.randn(5, 1, 28, 28) * 3
    per_class = torch.stack([ClassifierReward(classifier, c)(x) for c in range(10)], dim=1)
    assert per_class.shape == (5, 10) and (per_class <= 0).all()
    assert torch.allclose(per_class.exp().sum(1), torch.ones(5), atol=1e-5)
    assert torch.equal(ClassifierReward(classifier, 3)(x), ClassifierReward(classifier, 3)(x.clamp(-1, 1)))


@pytest.mark.parametrize("bad", [-1, 10, 2.0, True, "7"])
def test_classifier_reward_rejects_bad_classes(bad):
    with pytest.raises(ValueError, match="target_class"):
        ClassifierReward(RewardClassifier(), bad)


# --- training: resume equals an uninterrupted run ---------------------------------------

def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddpm_resume_matches_uninterrupted_run(tmp_path):
    images = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def config(steps: int) -> DDPMTrainConfig:
        return DDPMTrainConfig(steps=steps, batch_size=3, warmup_steps=2, model=TINY_UNET, log_every=1)

    train_ddpm(config(3), tmp_path / "resumed", images, progress=False)
    assert load_checkpoint(tmp_path / "resumed").step == 3
    train_ddpm(config(5), tmp_path / "resumed", images, resume=True, progress=False)
    train_ddpm(config(5), tmp_path / "straight", images, progress=False)
    resumed, straight = load_checkpoint(tmp_path / "resumed"), load_checkpoint(tmp_path / "straight")
    assert resumed.step == straight.step == 5
    assert _tensors_equal(resumed.model, straight.model) and _tensors_equal(resumed.ema, straight.ema)
    for index, state in straight.optimizer_state.items():
        assert _tensors_equal(resumed.optimizer_state[index], state)
    assert torch.equal(resumed.rng_state, straight.rng_state)
    # and training moved the weights at all (the equality above is not vacuous)
    fresh = UNet(TINY_UNET).state_dict()
    assert not torch.equal(fresh["stem.weight"], straight.model["stem.weight"])
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["loss"] > 0 for r in log)


def test_ddpm_resume_refuses_a_different_model(tmp_path):
    images = torch.zeros(4, 1, 28, 28)
    train_ddpm(DDPMTrainConfig(steps=1, batch_size=2, model=TINY_UNET), tmp_path, images, progress=False)
    other = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention=False, num_groups=4)
    with pytest.raises(ValueError, match="model config differs"):
        train_ddpm(DDPMTrainConfig(steps=2, batch_size=2, model=other), tmp_path, images, resume=True,
                   progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint: pass --resume"):
        train_ddpm(DDPMTrainConfig(steps=2, batch_size=2, model=TINY_UNET), tmp_path, images, progress=False)


def test_interrupted_classifier_run_resumes_exactly(tmp_path, monkeypatch):
    # the classifier's cosine schedule depends on the total steps, so interrupt a 5-step run
    # after 3 steps (Ctrl-C writes a checkpoint) instead of running a shorter one
    from fvdiffusion.train import resumable

    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen))
    config = ClassifierTrainConfig.for_kind("reward", steps=5, batch_size=4, warmup_steps=1)

    interrupt_training_at(monkeypatch, 3)  # Ctrl-C at step 3
    with pytest.raises(resumable.TrainingInterrupted, match="SIGINT: stopped at step 3"):
        train_classifier(config, tmp_path / "resumed", data, None, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed").step == 3
    summary = train_classifier(config, tmp_path / "resumed", data, None, resume=True, progress=False)
    train_classifier(config, tmp_path / "straight", data, None, progress=False)
    assert summary.step == 5 and summary.reference_accuracy is None
    resumed, straight = load_checkpoint(tmp_path / "resumed"), load_checkpoint(tmp_path / "straight")
    assert _tensors_equal(resumed.model, straight.model)
    assert not torch.equal(RewardClassifier().state_dict()["body.0.weight"], straight.model["body.0.weight"])


# --- quality check ----------------------------------------------------------------------

class _ConstantClassifier(torch.nn.Module):
    """Always predicts class 3 with probability ~1."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.full((10,), -20.0).index_fill(0, torch.tensor([3]), 20.0))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10)


def test_quality_report_counts_confidence_and_histogram_tv():
    torch.manual_seed(0)
    from fvdiffusion.schedule import VPSchedule

    denoiser = ModuleDenoiser(UNet(TINY_UNET).eval(), VPSchedule.linear(1000), (1, 28, 28))
    report = ddpm_quality(denoiser, _ConstantClassifier(), n=6, steps=3, batch_size=4)
    assert report.n == 6 and report.confident_fraction == 1.0
    assert report.class_histogram == [0, 0, 0, 6, 0, 0, 0, 0, 0, 0]
    assert report.tv_to_uniform == pytest.approx(0.9) and not report.meets_bars
    # the seed alone fixes the samples
    a, b = (sample_ddpm(denoiser, 5, steps=3, seed=1, batch_size=2) for _ in range(2))
    c = sample_ddpm(denoiser, 5, steps=3, seed=2, batch_size=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 1, 28, 28) and torch.isfinite(a).all()


def test_quality_samples_are_the_engines_base_method():
    """sample_ddpm is fv.sample("base", eta=1) with the same seed; its batch_size is the engine's
    micro-batch (the samples do not depend on it); clip_x0 is the engine's clip_x0=1.0."""
    torch.manual_seed(0)
    import fvdiffusion as fv
    from fvdiffusion.schedule import VPSchedule

    denoiser = ModuleDenoiser(UNet(TINY_UNET).eval(), VPSchedule.linear(1000), (1, 28, 28))
    ours = sample_ddpm(denoiser, 5, steps=3, seed=4, batch_size=2)
    engine = fv.sample("base", denoiser, n_particles=5, num_steps=3, seed=4, eta=1.0).samples
    assert torch.equal(ours, engine.cpu())
    assert torch.equal(ours, sample_ddpm(denoiser, 5, steps=3, seed=4, batch_size=5))
    clipped = sample_ddpm(denoiser, 5, steps=3, seed=4, batch_size=2, clip_x0=True)
    assert torch.equal(clipped, fv.sample("base", denoiser, n_particles=5, num_steps=3, seed=4, eta=1.0,
                                          clip_x0=1.0).samples.cpu())
    assert not torch.equal(clipped, ours)


# --- `fvd train` command group -----------------------------------------------------------

def _train_cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from fvdiffusion.cli.train import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["train", *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["ddpm", "--device", "tpu9"], "unknown device"),
        (["ddpm", "--batch-size", "0"], "batch_size must be a positive int"),
        (["export", "--kind", "ddpm", "--run", "no/such/run", "--out", "unused"], "no checkpoint"),
        (["quality", "--ddpm", "no/such.safetensors"], "weights file not found"),
    ],
)
def test_train_cli_reports_bad_arguments_in_one_line(args, message):
    result = _train_cli(args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_train_cli_quality_runs_on_shipped_weights(tmp_path):
    out = tmp_path / "q.json"
    result = _train_cli(["quality", "--n", "3", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 3 and sum(report["class_histogram"]) == 3
