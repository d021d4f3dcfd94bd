"""Load the shipped networks from safetensors (no network access, no pickle).

A zoo weights file carries, in its safetensors header, the network ``kind`` and the
architecture config as JSON, so the file alone rebuilds the module. Every load checks the
file's keys and shapes against that architecture and names the file in any error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fvdiffusion.denoisers.base import ModuleDenoiser
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.zoo.classifiers import EvalNet, EvalNetConfig, RewardClassifier, RewardClassifierConfig
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig
from fvdiffusion.zoo.unet import UNet, UNetConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "fvdiffusion-zoo/1"
WEIGHT_FILES = {
    "ddpm": "ddpm.safetensors",
    "reward_classifier": "reward_classifier.safetensors",
    "eval_net": "eval_net.safetensors",
    "feature_net": "feature_net.safetensors",
}
_ARCHITECTURES = {
    "ddpm": (UNet, UNetConfig),
    "reward_classifier": (RewardClassifier, RewardClassifierConfig),
    "eval_net": (EvalNet, EvalNetConfig),
    "feature_net": (FeatureNet, FeatureNetConfig),
}
MNIST_SAMPLE_SHAPE = (1, 28, 28)


class WeightsMissingError(FileNotFoundError):
    """A zoo weights file does not exist."""


class WeightsError(ValueError):
    """A zoo weights file exists but cannot be used (truncated, wrong kind, keys or shapes)."""


def default_path(kind: str) -> Path:
    if kind not in WEIGHT_FILES:
        raise ValueError(f"kind: expected one of {sorted(WEIGHT_FILES)}, got {kind!r}")
    return WEIGHTS_DIR / WEIGHT_FILES[kind]


def load_ddpm(path: str | Path | None = None, device: str | torch.device = "cpu") -> ModuleDenoiser:
    """The shipped unconditional MNIST DDPM: eps-prediction, linear VP schedule with 1000 steps."""
    unet = load_module("ddpm", path, device)
    return ModuleDenoiser(unet, VPSchedule.linear(1000), MNIST_SAMPLE_SHAPE, prediction_type="eps")


def load_reward_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> RewardClassifier:
    return load_module("reward_classifier", path, device)


def load_eval_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> EvalNet:
    return load_module("eval_net", path, device)


def load_feature_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """The autoencoder whose latent is the second FID/KID feature space (``metrics.feature_spaces``)."""
    return load_module("feature_net", path, device)


def load_module(kind: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the ``kind`` network from a zoo file, in eval mode with gradients off."""
    path = Path(path) if path is not None else default_path(kind)
    tensors, config = _read(path, kind)
    module_cls, config_cls = _ARCHITECTURES[kind]
    try:
        module = module_cls(config_cls.from_dict(config))
    except (TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"weights file {path}: bad architecture config in header ({err})") from None
    _check_state(path, module.state_dict(), tensors)
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module.to(device).eval().requires_grad_(False)


def write_weights(module: nn.Module, kind: str, path: Path, fp16: bool = False, extra: dict | None = None) -> Path:
    """Save ``module`` in the zoo format (its ``config`` dataclass goes into the header)."""
    if kind not in _ARCHITECTURES:
        raise ValueError(f"kind: expected one of {sorted(_ARCHITECTURES)}, got {kind!r}")
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    header = {"format": FORMAT, "kind": kind, "config": json.dumps(module.config.to_dict())}
    header.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    path.chmod(0o644)  # safetensors writes 0600; shipped files must be readable by every user
    return path


def _read(path: Path, kind: str) -> tuple[dict[str, Tensor], dict]:
    if not path.is_file():
        raise WeightsMissingError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"weights file {path} is corrupted or not safetensors ({err})") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"weights file {path}: not an fvdiffusion zoo file (header format {header.get('format')!r})")
    if header.get("kind") != kind:
        raise WeightsError(f"weights file {path}: holds a {header.get('kind')!r} network, expected {kind!r}")
    try:
        config = json.loads(header["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise WeightsError(f"weights file {path}: missing or unreadable architecture config ({err})") from None
    return tensors, config


def _check_state(path: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path}: wrong keys (missing {_preview(missing)}, unexpected {_preview(unexpected)})"
        )
    for key, ref in expected.items():
        got = found[key]
        if got.shape != ref.shape:
            raise WeightsError(f"weights file {path}: {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if not got.is_floating_point():
            raise WeightsError(f"weights file {path}: {key} has dtype {got.dtype}, expected a float tensor")
        if not torch.isfinite(got).all():
            raise WeightsError(f"weights file {path}: {key} contains NaN or inf")


def _preview(keys: list[str], limit: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
