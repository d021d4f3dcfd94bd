"""Image rewards: known values, the batch contract, and the missing-extra / missing-weights paths."""

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

from fvdiffusion.rewards.image_rewards import Brightness, Colourfulness, JpegCompressibility  # noqa: E402
from fvdiffusion.rewards.model_rewards import (  # noqa: E402
    AestheticScore, CLIPScore, ImageRewardScore, MissingExtraError, MissingWeightsError, preprocess,
)

PROMPT = "a red cat"


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Distinct images: noise of increasing contrast around distinct colours."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g)
    contrast = torch.linspace(0.05, 0.5, n).view(n, 1, 1, 1)
    return (base + contrast * (torch.rand(n, 3, size, size, generator=g) - 0.5)).clamp(0, 1)


def assert_batch_contract(reward, x, cond=None, tol=1e-5):
    """Batched and one-by-one results agree and keep input order (values distinct so order shows)."""
    batched = reward(x, cond)
    single = torch.cat([reward(x[i : i + 1], cond) for i in range(x.shape[0])])
    assert batched.shape == (x.shape[0],) and batched.dtype.is_floating_point
    torch.testing.assert_close(batched, single, rtol=tol, atol=tol)
    assert batched.unique().numel() == x.shape[0]
    flipped = reward(x.flip(0), cond)
    torch.testing.assert_close(flipped, batched.flip(0), rtol=tol, atol=tol)


def test_colourfulness_known_values():
    grey = torch.full((1, 3, 4, 4), 0.5)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    values = Colourfulness()(torch.cat([grey, red]))
    # pure red: rg = 255, yb = 127.5 everywhere, σ = 0, M = 0.3 · √(255² + 127.5²)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.3 * (255**2 + 127.5**2) ** 0.5]))


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.4)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = JpegCompressibility()(torch.cat([flat, noisy]))
    assert r[0] > r[1] and (r < 0).all()
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


@pytest.mark.parametrize("reward", [Brightness(), Colourfulness(), JpegCompressibility()], ids=lambda r: r.name)
def test_weight_free_rewards_batch_contract(reward):
    assert_batch_contract(reward, images(6))


def test_image_rewards_reject_non_image_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        Brightness()(torch.zeros(2, 4, 8, 8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_diffusers.clip_model_dir(tmp_path_factory.mktemp("clip"))


def test_clip_score_on_a_tiny_local_model(clip_dir):
    reward = CLIPScore(clip_dir)
    assert_batch_contract(reward, images(5), PROMPT)
    scores = reward(images(5), PROMPT)
    assert (scores.abs() <= 100 + 1e-4).all()
    assert not torch.allclose(scores, reward(images(5), "a blue dog"))  # the prompt matters
    with pytest.raises(ValueError, match="prompt string as cond"):
        reward(images(2), None)


def _tiny_aesthetic_weights(path: Path, in_dim: int) -> Path:
    g = torch.Generator().manual_seed(0)
    sizes = [(16, in_dim), (8, 16), (8, 8), (4, 8), (1, 4)]
    state = {}
    for layer, (out_f, in_f) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{layer}.weight"] = torch.randn(out_f, in_f, generator=g)
        state[f"layers.{layer}.bias"] = torch.randn(out_f, generator=g)
    save_file(state, str(path))
    return path


def test_aesthetic_score_on_a_tiny_local_model(clip_dir, tmp_path):
    weights = _tiny_aesthetic_weights(tmp_path / "mlp.safetensors", in_dim=8)
    reward = AestheticScore(weights, clip_model=clip_dir)
    assert_batch_contract(reward, images(5))
    wrong_dim = _tiny_aesthetic_weights(tmp_path / "wrong.safetensors", in_dim=12)
    with pytest.raises(ValueError, match="12-d CLIP embeddings"):
        AestheticScore(wrong_dim, clip_model=clip_dir)


def test_aesthetic_rejects_foreign_weights(tmp_path):
    save_file({"fc.weight": torch.zeros(1, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="expected keys"):
        AestheticScore(tmp_path / "x.safetensors")


def test_missing_weights_are_reported_as_such(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere"):
        CLIPScore(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="not found"):
        AestheticScore(tmp_path / "missing.safetensors")
    with pytest.raises(OSError):  # MissingWeightsError is an OSError for callers that catch those
        AestheticScore(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "hidden, build, extra",
    [
        ("ImageReward", lambda tmp: ImageRewardScore(), "imagereward"),
        ("transformers", lambda tmp: CLIPScore(), "clip"),
        ("transformers", lambda tmp: AestheticScore(_tiny_aesthetic_weights(tmp / "m.safetensors", 8)), "aesthetic"),
        ("PIL", lambda tmp: JpegCompressibility()(torch.zeros(1, 3, 8, 8)), "plot"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, tmp_path, hidden, build, extra):
    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` raise ImportError
    with pytest.raises(MissingExtraError, match=rf"pip install 'fvdiffusion\[{extra}\]'") as info:
        build(tmp_path)
    assert isinstance(info.value, ImportError)


class _FakeBlip(torch.nn.Module):
    """Stands in for ImageReward's BLIP (the package cannot be installed here): same call shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 8, kernel_size=56, stride=56)  # 224 -> 4×4 patches of width 8
        self.embed = torch.nn.Embedding(100, 8)

    def visual_encoder(self, pixels):
        return self.patch(pixels).flatten(2).transpose(1, 2)  # [B, 16, 8]

    def tokenizer(self, prompt, padding, truncation, max_length, return_tensors):
        return _Tokens(_ids(prompt, max_length))

    def text_encoder(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        assert input_ids.shape[0] == encoder_hidden_states.shape[0] == encoder_attention_mask.shape[0]
        hidden = self.embed(input_ids) + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=hidden)


class _Tokens:
    def __init__(self, ids):
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)

    def to(self, device):
        return self


def _ids(prompt, max_length=35):
    return torch.tensor([[ord(c) % 100 for c in prompt[:max_length].ljust(max_length)]])


def _fake_imagereward_package(load):
    package = types.ModuleType("ImageReward")
    package.load = load
    return package


def test_imagereward_forward_on_batches(monkeypatch):
    model = torch.nn.Module()
    model.blip = _FakeBlip()
    model.mlp = torch.nn.Linear(8, 1)
    model.mean, model.std = 0.2, 1.5
    monkeypatch.setitem(sys.modules, "ImageReward", _fake_imagereward_package(lambda name, device, download_root: model))
    reward = ImageRewardScore(device="cpu")
    assert_batch_contract(reward, images(4, size=32), PROMPT)
    with torch.no_grad():  # the normalisation the package applies
        pixels = preprocess(images(1, size=32), 224)
        raw = model.mlp((model.blip.embed(_ids(PROMPT)) + model.blip.visual_encoder(pixels).mean(1, keepdim=True))[:, 0])
    torch.testing.assert_close(reward(images(1, size=32), PROMPT), ((raw - 0.2) / 1.5).squeeze(-1))


def test_imagereward_download_failure_is_missing_weights(monkeypatch):
    def load(name, device, download_root):
        raise OSError("couldn't connect to huggingface.co")

    monkeypatch.setitem(sys.modules, "ImageReward", _fake_imagereward_package(load))
    with pytest.raises(MissingWeightsError, match="ImageReward-v1.0"):
        ImageRewardScore(device="cpu")
