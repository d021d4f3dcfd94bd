"""Load the shipped networks from safetensors (no network access, no pickle).

A zoo weights file carries, in its safetensors header, the network ``kind`` and the
architecture config as JSON, so the file alone rebuilds the module. Loading is verified in
this order, and nothing is allocated before the header has passed:

1. **Size**: the file is at most :data:`MAX_FILE_BYTES`.
2. **Content hash**: the model card beside the file (``ddpm.md`` for ``ddpm.safetensors``)
   records its SHA-256; the file must match it. Shipped weights must have it; a user's file
   is checked when such a card is present and otherwise loads on the structural checks alone.
3. **Header**: format, kind and every architecture config field against explicit bounds
   (:data:`CONFIG_BOUNDS`); the network is then built on the ``meta`` device (no memory)
   and its parameter count bounded by :data:`MAX_PARAMETERS`.
4. **Keys, shapes, dtypes** from the header (no tensor data read) against that network.
5. **Values**: each tensor, read one at a time, must be finite and at most
   :data:`MAX_ABS_VALUE` in magnitude; only then is it placed into the network.

Every failure is a one-line :class:`WeightsError` naming the file (and the field or tensor).
Without a hash, corruption that keeps every value finite and plausibly small (flipped low
mantissa bits, for instance) cannot be told from a trained network.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from fvdiffusion.denoisers.base import ModuleDenoiser
from fvdiffusion.durable import write_atomically
from fvdiffusion.errors import WeightsError, WeightsMissingError
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.zoo.classifiers import (
    EvalNet,
    EvalNetConfig,
    MlpClassifier,
    MlpClassifierConfig,
    RewardClassifier,
    RewardClassifierConfig,
)
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig
from fvdiffusion.zoo.unet import UNet, UNetConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "fvdiffusion-zoo/1"
WEIGHT_FILES = {
    "ddpm": "ddpm.safetensors",
    "reward_classifier": "reward_classifier.safetensors",
    "eval_net": "eval_net.safetensors",
    "feature_net": "feature_net.safetensors",
    "mlp_classifier": "mlp_classifier.safetensors",
}
_ARCHITECTURES = {
    "ddpm": (UNet, UNetConfig),
    "reward_classifier": (RewardClassifier, RewardClassifierConfig),
    "eval_net": (EvalNet, EvalNetConfig),
    "feature_net": (FeatureNet, FeatureNetConfig),
    "mlp_classifier": (MlpClassifier, MlpClassifierConfig),
}
MNIST_SAMPLE_SHAPE = (1, 28, 28)

# The shipped networks have at most 1.1M parameters (4.3 MB); these bounds leave room for much
# larger user-trained ones while keeping any accepted file's memory far below a machine's.
MAX_PARAMETERS = 50_000_000
MAX_FILE_BYTES = 4 * MAX_PARAMETERS + (1 << 20)  # float32 tensors plus a generous header
MAX_ABS_VALUE = 1e4  # the shipped weights stay below 10; a larger value is corruption or divergence
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# field -> ("int", lo, hi) | ("bool",) | ("float", lo, hi_exclusive) | ("ints", lo, hi, max_len)
CONFIG_BOUNDS: dict[str, dict[str, tuple]] = {
    "ddpm": {
        "in_channels": ("int", 1, 1),  # load_ddpm serves 1x28x28 digits
        "image_size": ("int", 28, 28),
        "base_channels": ("int", 1, 256),
        "channel_mults": ("ints", 1, 16, 3),  # 28 halves at most twice
        "num_res_blocks": ("int", 1, 8),
        "attention": ("bool",),
        "num_heads": ("int", 1, 64),
        "num_groups": ("int", 1, 256),
        "dropout": ("float", 0.0, 1.0),
    },
    "reward_classifier": {
        "channels1": ("int", 1, 512),
        "channels2": ("int", 1, 512),
        "hidden": ("int", 1, 4096),
        "dropout": ("float", 0.0, 1.0),
    },
    "eval_net": {
        "widths": ("ints", 1, 1024, 3),
        "blocks_per_stage": ("int", 1, 8),
        "num_groups": ("int", 1, 1024),
    },
    "feature_net": {
        "channels1": ("int", 1, 512),
        "channels2": ("int", 1, 512),
        "latent_dim": ("int", 1, 1024),
    },
    "mlp_classifier": {
        "hidden1": ("int", 1, 4096),
        "hidden2": ("int", 1, 4096),
        "dropout": ("float", 0.0, 1.0),
    },
}

_CARD_HASH = re.compile(r"\*\*SHA-256\*\* of `([^`]+)`: `([0-9a-fA-F]{64})`")


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


def load_mlp_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> MlpClassifier:
    """The MLP classifier whose penultimate activations are the third FID/KID space (``mlp``)."""
    return load_module("mlp_classifier", path, device)


def load_module(kind: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the ``kind`` network from a zoo file, in eval mode with gradients off (checks: module docstring)."""
    if kind not in _ARCHITECTURES:
        raise ValueError(f"kind: expected one of {sorted(_ARCHITECTURES)}, got {kind!r}")
    path = Path(path) if path is not None else default_path(kind)
    if not path.is_file():
        raise WeightsMissingError(f"weights file not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise WeightsError(f"weights file {path}: {size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")
    verified = verify_hash(path, required=is_shipped(path))
    module = _build_checked(path, kind)  # on the meta device: no memory yet
    _materialise(path, module)
    if not verified:  # said only once the file passed every structural check (a bad file is just its error)
        warn_unverified(path)
    return module.to(device).eval().requires_grad_(False)


def is_shipped(path: Path) -> bool:
    """True for a file in the installed package's weights folder."""
    return path.resolve().parent == WEIGHTS_DIR.resolve()


def card_path(weights: Path) -> Path:
    """The model card beside a weights file: ``ddpm.md`` for ``ddpm.safetensors``."""
    return weights.with_suffix(".md")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_hash(card: Path) -> str | None:
    """The SHA-256 a model card records, or None when the card is absent or records none."""
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _CARD_HASH.search(text)
    return match.group(2).lower() if match else None


def warn_unverified(path: Path) -> None:
    """Say once that ``path`` loads on structural checks alone (no card with a SHA-256 beside it)."""
    import warnings

    from fvdiffusion.errors import UnverifiedWeightsWarning

    warnings.warn(f"weights file {path} has no model card recording its SHA-256: only its structure and value "
                  f"ranges were checked, so corruption that keeps every value finite and small (e.g. flipped "
                  f"bits) would go unnoticed", UnverifiedWeightsWarning, stacklevel=3)


def verify_hash(path: Path, required: bool = False) -> bool:
    """Check ``path`` against the SHA-256 in its model card; returns whether a hash was checked.

    ``required`` (shipped weights): a card without a hash is itself an error.
    """
    card = card_path(path)
    expected = recorded_hash(card)
    if expected is None:
        if required:
            raise WeightsError(f"weights file {path}: its model card {card} records no SHA-256, so the shipped "
                               f"weights cannot be verified (reinstall fvdiffusion)")
        return False
    found = sha256_of(path)
    if found != expected:
        fix = ("reinstall fvdiffusion" if required
               else "re-export it, or remove the card to load the file unverified")
        raise WeightsError(f"weights file {path}: SHA-256 {found[:16]}... does not match {expected[:16]}... "
                           f"recorded in its model card {card.name} (corrupted or replaced; {fix})")
    return True


def write_weights(module: nn.Module, kind: str, path: Path, fp16: bool = False, extra: dict | None = None) -> Path:
    """Save ``module`` in the zoo format (its ``config`` dataclass goes into the header)."""
    if kind not in _ARCHITECTURES:
        raise ValueError(f"kind: expected one of {sorted(_ARCHITECTURES)}, got {kind!r}")
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    header = {"format": FORMAT, "kind": kind, "config": json.dumps(module.config.to_dict())}
    header.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # serialised in memory, written by the one atomic writer: a full disk names the file and leaves
    # no partial one (safetensors' own writer would report "IoError" and leave what it wrote)
    write_atomically(path, save(tensors, metadata=header))
    path.chmod(0o644)  # safetensors writes 0600; shipped files must be readable by every user
    return path


# --- the checks ----------------------------------------------------------------------------

def _build_checked(path: Path, kind: str) -> nn.Module:
    """Read the header only, check it, and build the network on the meta device."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            found = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"weights file {path} is corrupted or not safetensors ({_one_line(err)})") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"weights file {path}: not an fvdiffusion zoo file (header format {header.get('format')!r})")
    if header.get("kind") != kind:
        raise WeightsError(f"weights file {path}: holds a {header.get('kind')!r} network, expected {kind!r}")
    try:
        raw = json.loads(header["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise WeightsError(f"weights file {path}: missing or unreadable architecture config ({err})") from None
    config = bounded_config(kind, raw, f"weights file {path}: header config")
    module_cls, _ = _ARCHITECTURES[kind]
    with torch.device("meta"):
        module = module_cls(config)
    n_params = sum(t.numel() for t in module.state_dict().values())
    if n_params > MAX_PARAMETERS:
        raise WeightsError(f"weights file {path}: header config asks for {n_params:,} parameters, "
                           f"over the {MAX_PARAMETERS:,} limit")
    _check_header_state(path, module.state_dict(), found)
    return module


def bounded_config(kind: str, raw: Any, where: str) -> Any:
    """The ``kind`` config dataclass from JSON ``raw``, after every field is checked against CONFIG_BOUNDS.

    Raises WeightsError starting with ``where`` and naming the field.
    """
    _, config_cls = _ARCHITECTURES[kind]
    bounds = CONFIG_BOUNDS[kind]
    if not isinstance(raw, dict):
        raise WeightsError(f"{where} is not a JSON object")
    unknown = sorted(set(raw) - set(bounds))
    if unknown:
        raise WeightsError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}")
    for field, spec in bounds.items():
        if field in raw:
            problem = _out_of_bounds(raw[field], spec)
            if problem:
                raise WeightsError(f"{where}: {field}={_short(raw[field])} {problem}")
    try:
        return config_cls.from_dict(raw)
    except (TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"{where} is invalid ({_one_line(err)})") from None


def _out_of_bounds(value: Any, spec: tuple) -> str | None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    kind = spec[0]
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "int":
        lo, hi = spec[1], spec[2]
        return None if is_int(value) and lo <= value <= hi else f"must be an int in [{lo}, {hi}]"
    if kind == "float":
        lo, hi = spec[1], spec[2]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value < hi
        return None if ok else f"must be a number in [{lo}, {hi})"
    lo, hi, max_len = spec[1], spec[2], spec[3]
    ok = (isinstance(value, list) and 1 <= len(value) <= max_len
          and all(is_int(v) and lo <= v <= hi for v in value))
    return None if ok else f"must be a list of 1 to {max_len} ints in [{lo}, {hi}]"


def _check_header_state(path: Path, expected: dict[str, Tensor], found: dict[str, tuple[tuple, str]]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path}: wrong keys (missing {_preview(missing)}, unexpected {_preview(unexpected)})"
        )
    for key, ref in expected.items():
        shape, dtype = found[key]
        if shape != tuple(ref.shape):
            raise WeightsError(f"weights file {path}: {key} has shape {shape}, expected {tuple(ref.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"weights file {path}: {key} has dtype {dtype}, expected a float tensor")


def _materialise(path: Path, module: nn.Module) -> None:
    """Read the tensors one at a time, check their values, and place them into the meta-built module."""
    state = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in module.state_dict():
                tensor = fh.get_tensor(key)
                if not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise WeightsError(f"weights file {path}: {key} contains NaN or inf ({bad} of {tensor.numel()} "
                                       f"values)")
                peak = tensor.abs().max().item() if tensor.numel() else 0.0
                if peak > MAX_ABS_VALUE:
                    raise WeightsError(f"weights file {path}: {key} holds a value of magnitude {peak:.3g}, over the "
                                       f"{MAX_ABS_VALUE:g} plausibility limit (corrupted or diverged)")
                state[key] = tensor.float()
    except (SafetensorError, OSError, RuntimeError) as err:
        raise WeightsError(f"weights file {path} is corrupted or not safetensors ({_one_line(err)})") from None
    module.load_state_dict(state, assign=True)
    left = [name for name, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:  # a tensor outside the state dict: cannot come from the file
        raise WeightsError(f"weights file {path}: no values for {_preview(left)}")


def _preview(keys: list[str], limit: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
