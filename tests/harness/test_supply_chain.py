"""Loading what others publish: dependency floors that load safely, safetensors only, a revision pin,
and no unsafe torch.load anywhere (issue 10, must-exist item 7)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "t2i"))

FLOORS = {"torch": (2, 6), "diffusers": (0, 31), "transformers": (5, 5)}


def _requirements() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_every_requirement_of_a_loader_package_has_the_safe_floor(package):
    specs = [r for r in _requirements() if re.match(rf"{package}\b", r)]
    assert specs, f"{package} is not required anywhere"
    for spec in specs:
        match = re.fullmatch(rf"{package}\s*>=\s*([\d.]+)", spec)
        assert match and _version(match.group(1)) >= FLOORS[package], spec


def test_the_installed_versions_meet_the_floors():
    from importlib.metadata import PackageNotFoundError, version

    for package, floor in FLOORS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        assert _version(installed) >= floor, f"{package} {installed} is below the floor {floor}"


def _calls(tree: ast.AST, dotted: str):
    head, attr = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
                and isinstance(node.func.value, ast.Name) and node.func.value.id == head):
            yield node


def test_no_unsafe_deserialisation_in_the_package():
    offenders = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, "torch.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in call.keywords)
            if not safe:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
        for name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
            offenders += [f"{path.relative_to(ROOT)}:{c.lineno} {name}" for c in _calls(tree, name)]
    assert offenders == []


# --- diffusers pipelines -------------------------------------------------------------------

def test_load_pipeline_asks_for_safetensors_and_forwards_the_revision(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from fvdiffusion.bench.t2i import load_pipeline

    seen = []

    class Pipe:
        def to(self, device):
            return self

    def from_pretrained(model, **kwargs):
        seen.append((model, kwargs))
        return Pipe()

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    load_pipeline("org/model", "float16", "cpu", revision="0123abcd")
    load_pipeline("org/model", "float32", "cpu")
    assert seen == [("org/model", {"use_safetensors": True, "torch_dtype": torch.float16, "revision": "0123abcd"}),
                    ("org/model", {"use_safetensors": True})]


def test_a_pipeline_with_only_pickled_weights_is_refused(tmp_path):
    pytest.importorskip("diffusers")
    tiny_diffusers = pytest.importorskip("tiny_diffusers")
    from fvdiffusion.bench.t2i import load_pipeline
    from fvdiffusion.errors import RunnerError

    pipe = tiny_diffusers.sd_pipeline()
    pickled, safe = tmp_path / "pickled", tmp_path / "safe"
    pipe.save_pretrained(pickled, safe_serialization=False)
    pipe.save_pretrained(safe)
    assert list(pickled.rglob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))
    with pytest.raises(RunnerError, match="safetensors") as err:
        load_pipeline(str(pickled), "float32", "cpu")
    assert str(pickled) in str(err.value) and "\n" not in str(err.value)
    assert load_pipeline(str(safe), "float32", "cpu") is not None


# --- transformers rewards --------------------------------------------------------------------

def test_clip_rewards_ask_for_safetensors_and_forward_the_revision(monkeypatch, tmp_path):
    """A hub id that is not cached, with the hub reachable: every load asks for safetensors and the pin."""
    transformers = pytest.importorskip("transformers")
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from fvdiffusion.rewards import hub, model_rewards

    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))
            self.config = type("C", (), {"vision_config": type("V", (), {"image_size": 16}), "projection_dim": 8})

    def recorder(kind, result):
        def from_pretrained(name, **kwargs):
            seen.append((kind, name, kwargs))
            return result()
        return from_pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    monkeypatch.setattr(hub, "offline_reason", lambda download: None)                # the hub may be contacted
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", recorder("model", Model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer", object))
    monkeypatch.setattr(transformers.ImageProcessingMixin, "get_image_processor_dict",
                        recorder("image", lambda: ({"size": {"shortest_edge": 16}}, {})))
    model_rewards.CLIPScore("org/clip", revision="r1")
    mlp = {f"layers.{i}.{p}": torch.zeros((n, m) if p == "weight" else (n,))
           for i, (n, m) in zip((0, 2, 4, 6, 7), [(4, 8), (4, 4), (4, 4), (4, 4), (1, 4)]) for p in ("weight", "bias")}
    save_file(mlp, str(tmp_path / "mlp.safetensors"))
    model_rewards.AestheticScore(tmp_path / "mlp.safetensors", clip_model="org/clip", clip_revision="r2")
    model_rewards.CLIPScore("org/clip")
    model_rewards.PickScore("org/pick", processor="org/proc", revision="r3", processor_revision="r4")
    assert seen == [
        ("model", "org/clip", {"use_safetensors": True, "revision": "r1"}),
        ("tokenizer", "org/clip", {"revision": "r1"}),
        ("image", "org/clip", {"revision": "r1"}),
        ("model", "org/clip", {"use_safetensors": True, "revision": "r2"}),
        ("tokenizer", "org/clip", {"revision": "r2"}),
        ("image", "org/clip", {"revision": "r2"}),
        ("model", "org/clip", {"use_safetensors": True}),
        ("tokenizer", "org/clip", {}),
        ("image", "org/clip", {}),
        ("model", "org/pick", {"use_safetensors": True, "revision": "r3"}),
        ("tokenizer", "org/proc", {"revision": "r4"}),
        ("image", "org/proc", {"revision": "r4"}),
    ]


def test_a_clip_model_with_only_pickled_weights_is_refused(tmp_path):
    pytest.importorskip("transformers")
    tiny_diffusers = pytest.importorskip("tiny_diffusers")
    import torch
    from safetensors.torch import load_file

    from fvdiffusion.errors import MissingWeightsError
    from fvdiffusion.rewards.model_rewards import CLIPScore

    clip_dir = tiny_diffusers.clip_model_dir(tmp_path / "clip")
    CLIPScore(clip_dir)  # the safetensors directory loads
    weights = clip_dir / "model.safetensors"
    torch.save(load_file(str(weights)), clip_dir / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(MissingWeightsError, match="safetensors") as err:
        CLIPScore(clip_dir)
    assert str(clip_dir) in str(err.value)
