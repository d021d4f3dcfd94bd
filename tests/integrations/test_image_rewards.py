"""Image rewards: known values, the batch contract, local-path-first loading, offline failures
without a hub request, PickScore against the authors' recipe, the aesthetic predictor's safe
conversion, ImageReward's removal, and the missing-extra / missing-weights paths.

Model rewards run on tiny, randomly initialised CLIP models built from the real transformers
classes and saved to temporary directories. No test may open a network connection: the
``network`` fixture (autouse) records every attempt, fails it as "no network", and each test
asserts which attempts (if any) it expected.
"""

import collections
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse fixture)

from fvdiffusion.rewards.image_rewards import Brightness, Colourfulness, JpegCompressibility  # noqa: E402
from fvdiffusion.errors import (  # noqa: E402
    ConversionError, HubUnreachableError, MissingExtraError, MissingWeightsError, RewardUnavailableError,
)
from fvdiffusion.rewards import hub  # noqa: E402
from fvdiffusion.rewards.model_rewards import (  # noqa: E402
    AestheticScore, CLIPScore, ImageRewardScore, PickScore, convert_aesthetic,
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


# --- no network, an empty hub cache -----------------------------------------------------------

@pytest.fixture(autouse=True)
def network(monkeypatch):
    """Every connection attempt (name lookup, connect) is recorded and fails as if there were no network."""
    attempts = []

    def refuse(kind):
        def refused(*args, **kwargs):
            attempts.append((kind, args[:2]))
            raise OSError(f"no network in tests ({kind})")
        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    return attempts


@pytest.fixture(autouse=True)
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and no offline setting unless a test sets one."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture
def loads(monkeypatch):
    """Records every from_pretrained-style call of the CLIP code path as (what, name, local_files_only);
    a call that may reach the hub (no local_files_only=True) fails at once, before any retry."""
    import transformers

    calls = []

    def recording(what, original):
        def wrapped(name, **kwargs):
            calls.append((what, str(name), kwargs.get("local_files_only", False)))
            if not kwargs.get("local_files_only", False):
                raise OSError(f"test: {what} {name!r} would have gone to the hub")
            return original(name, **kwargs)
        return wrapped

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained",
                        recording("model", transformers.CLIPModel.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recording("tokenizer", transformers.AutoTokenizer.from_pretrained))
    monkeypatch.setattr(transformers.ImageProcessingMixin, "get_image_processor_dict",
                        recording("image processor", transformers.ImageProcessingMixin.get_image_processor_dict))
    return calls


# --- tiny CLIP checkpoints built from the real classes ----------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_diffusers.clip_model_dir(tmp_path_factory.mktemp("clip"))


def _clip_model(projection_dim: int = 8, logit_scale: float | None = None):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=tiny_diffusers._text_config().to_dict(), vision_config=vision,
                                 projection_dim=projection_dim)).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    return model


def _image_processor():
    """A CLIP image processor with distinctive settings, so that a reward ignoring them scores differently."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
               image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    """PickScore's layout: the checkpoint (a CLIPModel, no tokenizer) and, apart, its processor
    (tokenizer + preprocessor_config.json, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K ships them)."""
    root = tmp_path_factory.mktemp("pickscore")
    _clip_model(logit_scale=3.0).save_pretrained(root / "model")
    tiny_diffusers.tokenizer().save_pretrained(root / "processor")
    _image_processor().save_pretrained(root / "processor")
    return root / "model", root / "processor"


def _quantised(n: int) -> torch.Tensor:
    return (images(n) * 255).round() / 255  # exactly representable as 8-bit images


def _pickscore_reference(model_dir, processor_dir, x, prompt):
    """The authors' recipe (PickScore README) on the transformers processor, with PIL images."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in x]
    image_inputs = processor(images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


# --- CLIP score ---------------------------------------------------------------------------------

def test_clip_score_on_a_tiny_local_model(clip_dir, network):
    reward = CLIPScore(clip_dir)
    assert_batch_contract(reward, images(5), PROMPT)
    scores = reward(images(5), PROMPT)
    assert (scores.abs() <= 100 + 1e-4).all()
    assert not torch.allclose(scores, reward(images(5), "a blue dog"))  # the prompt matters
    with pytest.raises(ValueError, match="prompt string as cond"):
        reward(images(2), None)
    assert network == []


def test_a_local_directory_is_used_as_it_is(clip_dir, loads, network, monkeypatch):
    """A local path never becomes a hub request, offline or not (as a Path or as a string)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    CLIPScore(clip_dir)
    CLIPScore(str(clip_dir))
    assert loads and all(local for _, _, local in loads), loads
    assert network == []


# --- offline: one line, at once, no request -----------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


OFFLINE_BUILDS = {
    "clip": (lambda tmp: CLIPScore(), "model='openai/clip-vit-large-patch14'"),
    "clip-id": (lambda tmp: CLIPScore("org/clip"), "model='org/clip'"),
    "pickscore": (lambda tmp: PickScore(), "model='yuvalkirstain/PickScore_v1'"),
    "aesthetic": (lambda tmp: AestheticScore(_tiny_aesthetic_weights(tmp / "m.safetensors", 8)),
                  "clip_model='openai/clip-vit-large-patch14'"),
}


@pytest.mark.parametrize("name", sorted(OFFLINE_BUILDS))
def test_offline_a_hub_id_fails_at_once_naming_the_argument(name, monkeypatch, tmp_path, loads, network):
    """HF_HUB_OFFLINE=1 and the id not cached: HubUnreachableError, one line naming the argument to pass
    a local directory to; no connection attempted, nothing asked of the hub (so no retries)."""
    build, names = OFFLINE_BUILDS[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as err:
        build(tmp_path)
    message = _one_line(err.value)
    assert names in message and "HF_HUB_OFFLINE" in message and "local directory" in message
    assert isinstance(err.value, MissingWeightsError) and isinstance(err.value, OSError)
    assert network == [] and all(local for _, _, local in loads), (network, loads)


def test_offline_fails_before_transformers_is_even_imported(tmp_path):
    """Importing transformers is most of what an offline failure would cost: it is not imported at all.
    (The wall time is measured in the report, not asserted: CPU load varies.)"""
    import subprocess

    code = ("import sys\n"
            "from fvdiffusion.errors import HubUnreachableError\n"
            "from fvdiffusion.rewards.model_rewards import CLIPScore, PickScore\n"
            "for build in (CLIPScore, PickScore):\n"
            "    try:\n"
            "        build()\n"
            "    except HubUnreachableError as exc:\n"
            "        print(exc)\n"
            "print('transformers imported' if 'transformers' in sys.modules else 'transformers not imported')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert len(lines) == 3 and "model='openai/clip-vit-large-patch14'" in lines[0], lines
    assert "model='yuvalkirstain/PickScore_v1'" in lines[1] and lines[2] == "transformers not imported", lines


def test_without_network_the_probe_is_the_only_attempt(monkeypatch, loads, network):
    """No offline setting, but no network: one probe connection fails, and the hub is never asked."""
    with pytest.raises(HubUnreachableError, match="no network") as err:
        CLIPScore("org/clip")
    assert "model='org/clip'" in _one_line(err.value)
    assert [kind for kind, _ in network] == ["create_connection"], network
    assert all(local for _, _, local in loads), loads


def test_download_false_never_contacts_the_hub(loads, network):
    with pytest.raises(HubUnreachableError, match="download=False"):
        PickScore("org/pickscore", download=False)
    assert network == [] and loads == []


def test_a_hub_id_in_the_local_cache_loads_offline(clip_dir, hub_cache, monkeypatch, loads, network):
    """local_files_only first: a cached hub id needs no network, and scores as the directory does."""
    import shutil

    repo = hub_cache / "models--org--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(clip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = CLIPScore("org/tiny-clip")
    torch.testing.assert_close(cached(images(3), PROMPT), CLIPScore(clip_dir)(images(3), PROMPT))
    assert ("model", "org/tiny-clip", True) in loads and all(local for _, _, local in loads)
    assert network == []


def test_hub_reachable_gives_up_within_its_timeout(monkeypatch):
    """A name lookup that hangs (resolvers ignore socket timeouts) cannot hold the caller."""
    import threading
    import time

    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(5)
        raise OSError("late")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        assert hub.hub_reachable(timeout=0.05) is False
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert elapsed < 4  # returned on its own timeout, not when the lookup ended (generous: a shared CPU)


@pytest.mark.parametrize("text, is_path", [("org/name", False), ("name", False), ("/abs/dir", True), ("./rel", True),
                                           ("~/models/clip", True), ("a/b/c", True), ("C:\\models", True)])
def test_paths_and_hub_ids_are_told_apart(text, is_path):
    assert hub.looks_like_path(text) is is_path


def test_a_missing_local_path_is_named_and_never_sent_to_the_hub(tmp_path, loads, network):
    for build in (lambda p: CLIPScore(p), lambda p: PickScore(p, processor=p), lambda p: CLIPScore(str(p))):
        with pytest.raises(MissingWeightsError, match="no such file or directory") as err:
            build(tmp_path / "nowhere")
        assert str(tmp_path / "nowhere") in _one_line(err.value)
    assert network == [] and loads == []


# --- PickScore ------------------------------------------------------------------------------------

def test_pickscore_matches_the_authors_recipe(pickscore_dirs, network):
    """exp(logit_scale) · cos(image, prompt) with the processor's tokenizer and image settings."""
    model_dir, processor_dir = pickscore_dirs
    reward = PickScore(model_dir, processor=processor_dir)
    x = _quantised(5)
    expected = _pickscore_reference(model_dir, processor_dir, x, PROMPT)
    torch.testing.assert_close(reward(x, PROMPT), expected, rtol=1e-4, atol=1e-4)
    assert reward.scale == pytest.approx(float(torch.tensor(3.0).exp()))
    assert_batch_contract(reward, x, PROMPT)
    assert network == []


def test_pickscore_shares_clipscores_code_path(pickscore_dirs):
    """Same backbone: PickScore / exp(logit_scale) == CLIPScore / 100 on the same model and processor."""
    model_dir, processor_dir = pickscore_dirs
    pick = PickScore(model_dir, processor=processor_dir)
    clip = CLIPScore(model_dir, processor=processor_dir)
    x = _quantised(4)
    torch.testing.assert_close(pick(x, PROMPT) / pick.scale, clip(x, PROMPT) / 100, rtol=1e-5, atol=1e-6)


def test_pickscore_takes_the_processor_from_the_model_directory_when_it_has_one(pickscore_dirs, tmp_path, network):
    import shutil

    model_dir, processor_dir = pickscore_dirs
    both = tmp_path / "both"
    shutil.copytree(model_dir, both)
    for f in processor_dir.iterdir():
        shutil.copy(f, both / f.name)
    x = _quantised(3)
    torch.testing.assert_close(PickScore(both)(x, PROMPT), PickScore(model_dir, processor=processor_dir)(x, PROMPT))
    assert network == []


def test_pickscore_offline_without_a_local_processor_names_processor(pickscore_dirs, monkeypatch, network):
    model_dir, _ = pickscore_dirs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as err:
        PickScore(model_dir)
    assert "processor='laion/CLIP-ViT-H-14-laion2B-s32B-b79K'" in _one_line(err.value)
    assert network == []


# --- the aesthetic predictor ------------------------------------------------------------------------

def _tiny_aesthetic_weights(path: Path, in_dim: int) -> Path:
    g = torch.Generator().manual_seed(0)
    sizes = [(16, in_dim), (8, 16), (8, 8), (4, 8), (1, 4)]
    state = {}
    for layer, (out_f, in_f) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{layer}.weight"] = torch.randn(out_f, in_f, generator=g)
        state[f"layers.{layer}.bias"] = torch.randn(out_f, generator=g)
    save_file(state, str(path))
    return path


def test_aesthetic_score_on_a_tiny_local_model(clip_dir, tmp_path, network):
    weights = _tiny_aesthetic_weights(tmp_path / "mlp.safetensors", in_dim=8)
    reward = AestheticScore(weights, clip_model=clip_dir)
    assert_batch_contract(reward, images(5))
    wrong_dim = _tiny_aesthetic_weights(tmp_path / "wrong.safetensors", in_dim=12)
    with pytest.raises(ValueError, match="12-d CLIP embeddings"):
        AestheticScore(wrong_dim, clip_model=clip_dir)
    assert network == []


def test_aesthetic_rejects_foreign_weights(tmp_path):
    save_file({"fc.weight": torch.zeros(1, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="expected keys"):
        AestheticScore(tmp_path / "x.safetensors")


class PublishedMLP(torch.nn.Module):
    """The improved-aesthetic-predictor's MLP (its ``layers``), whose state dict the published .pth holds."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A stand-in for sac+logos+ava1-l14-linearMSE.pth (torch.save of the state dict) and a CLIP with
    768-d projections (ViT-L/14's width) to score with."""
    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    mlp = PublishedMLP().eval()
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    _clip_model(projection_dim=768).save_pretrained(root / "clip")
    tiny_diffusers.tokenizer().save_pretrained(root / "clip")
    return root / "sac+logos+ava1-l14-linearMSE.pth", root / "clip", mlp


def test_the_published_pth_converts_and_scores_as_the_published_mlp(published, tmp_path, network):
    from safetensors.torch import load_file
    from torch.nn import functional as F
    from transformers import CLIPModel

    from fvdiffusion.rewards.model_rewards import preprocess

    pth, clip, mlp = published
    out = convert_aesthetic(pth, tmp_path / "aesthetic.safetensors")
    converted = load_file(str(out))
    assert set(converted) == set(mlp.state_dict())
    for key, value in mlp.state_dict().items():
        assert torch.equal(converted[key], value), key
    reward = AestheticScore(out, clip_model=clip)
    x = images(4)
    model = CLIPModel.from_pretrained(clip).eval()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=preprocess(x, 16))
        expected = mlp(F.normalize(getattr(features, "pooler_output", features), dim=-1)).squeeze(-1)
    torch.testing.assert_close(reward(x), expected, rtol=1e-5, atol=1e-5)
    assert network == []


def test_the_reward_never_unpickles_the_published_file(published, tmp_path, monkeypatch):
    """Given the .pth itself (or a pickle renamed .safetensors), the reward refuses it with the conversion
    command, and torch.load is never called."""
    pth, clip, _ = published

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the reward called torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    disguised = tmp_path / "aesthetic.safetensors"
    disguised.write_bytes(pth.read_bytes())
    for path in (pth, disguised):
        with pytest.raises(ValueError, match="fvd convert aesthetic") as err:
            AestheticScore(path, clip_model=clip)
        assert str(path) in _one_line(err.value)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for a malicious pickle's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _published_keys(value_of_first) -> collections.OrderedDict:
    state = collections.OrderedDict(PublishedMLP(input_size=8).state_dict())
    state["layers.0.weight"] = value_of_first
    return state


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save(_published_keys(_RunsCode(marker)), evil)
    with pytest.raises(ConversionError, match="refused") as err:
        convert_aesthetic(evil, tmp_path / "out.safetensors")
    assert str(evil) in _one_line(err.value)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_state_dict_with_a_non_tensor_or_wrong_shapes_is_refused(tmp_path):
    listed = tmp_path / "listed.pth"
    torch.save(_published_keys([[0.5] * 8] * 1024), listed)
    with pytest.raises(ConversionError, match="layers.0.weight is a list"):
        convert_aesthetic(listed, tmp_path / "out.safetensors")
    broken = tmp_path / "broken.pth"
    torch.save(_published_keys(torch.zeros(1024, 8)) | {"layers.2.weight": torch.zeros(128, 999)}, broken)
    with pytest.raises(ConversionError, match="layers.2"):
        convert_aesthetic(broken, tmp_path / "out.safetensors")
    with pytest.raises(ConversionError, match=".safetensors"):
        convert_aesthetic(broken, tmp_path / "out.pth")
    assert not (tmp_path / "out.safetensors").exists()


def test_fvd_convert_aesthetic(published, tmp_path):
    from typer.testing import CliRunner

    from fvdiffusion.cli import app

    pth, _, mlp = published
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "aesthetic", str(pth), "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["layers.7.weight"], mlp.state_dict()["layers.7.weight"])
    marker = tmp_path / "payload-ran"
    torch.save(_published_keys(_RunsCode(marker)), tmp_path / "evil.pth")
    result = runner.invoke(app, ["convert", "aesthetic", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "b.safetensors")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "evil.pth" in lines[0]
    assert not marker.exists() and not (tmp_path / "b.safetensors").exists()


# --- ImageReward: removed, with what to use instead ------------------------------------------------

def test_imagereward_is_refused_with_what_to_use_instead(tmp_path):
    from fvdiffusion.bench.t2i import T2ISettings, run_t2i
    from fvdiffusion.errors import RunnerError

    for build in (lambda: ImageRewardScore(), lambda: ImageRewardScore("ImageReward-v1.0", device="cpu")):
        with pytest.raises(RewardUnavailableError, match="PickScore") as err:
            build()
        _one_line(err.value)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    settings = T2ISettings(model="unused", reward="imagereward", reward_model=None, method="fvd", particles=2,
                           steps=2, seed=0, guidance=7.5, dtype="float32")
    with pytest.raises(RunnerError, match="PickScore"):
        run_t2i(settings, prompts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- missing packages and weights -------------------------------------------------------------------

def test_missing_weights_are_reported_as_such(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere"):
        CLIPScore(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="no such file"):
        AestheticScore(tmp_path / "missing.safetensors")
    with pytest.raises(OSError):  # MissingWeightsError is an OSError for callers that catch those
        AestheticScore(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "hidden, build, extra",
    [
        ("transformers", lambda tmp: CLIPScore(), "clip"),
        ("transformers", lambda tmp: PickScore(), "pickscore"),
        ("transformers", lambda tmp: AestheticScore(_tiny_aesthetic_weights(tmp / "m.safetensors", 8)), "aesthetic"),
        ("PIL", lambda tmp: JpegCompressibility()(torch.zeros(1, 3, 8, 8)), "plot"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, tmp_path, hidden, build, extra):
    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` raise ImportError
    with pytest.raises(MissingExtraError, match=rf"pip install -e '\.\[{extra}\]'") as info:
        build(tmp_path)
    assert isinstance(info.value, ImportError)
