"""Rewards backed by pretrained models: CLIP score, PickScore, LAION aesthetic predictor.

Each needs an optional extra, imported only when the reward is built; a missing package raises
:class:`MissingExtraError` (an ImportError) naming the extra to install. Every model argument
is a **local path first** (used as it is, never a hub request) or a hub id, resolved by
:func:`fvdiffusion.rewards.hub.load_pretrained`: a hub id is loaded from the local Hugging
Face cache when it is there, and downloaded only when allowed; offline (``HF_HUB_OFFLINE=1``,
no network, or ``download=False``) a hub id that is not cached fails at once with a one-line
:class:`HubUnreachableError` naming the argument to pass a local directory to. Weights that
cannot be loaded raise :class:`MissingWeightsError` (an OSError), also one line.

Weights are read from safetensors only: transformers models with ``use_safetensors=True`` (a
model shipping only pickled ``.bin`` weights is refused) and the aesthetic MLP with
safetensors' loader; the published aesthetic ``.pth`` goes through the explicit conversion
:func:`convert_aesthetic` (``fvd convert aesthetic``) once. Like the weight-free rewards,
each takes images [B, 3, H, W] in [0, 1] and returns [B]; the prompt-aware ones take the
prompt string as ``cond``. Preprocessing (resize, centre crop, normalise, with the settings of
the model's image processor) runs in torch on the batch, so rewards stay on the device and batched.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from fvdiffusion.errors import (
    ConversionError, MissingExtraError, MissingWeightsError, RewardUnavailableError,
)
from fvdiffusion.rewards.hub import first_line, load_pretrained, locate, preflight

# OpenAI CLIP's normalisation: the default when a model comes without an image processor config
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's tokenizer and image processor

PathLike = str | os.PathLike[str]


def _missing(module: str, extra: str) -> MissingExtraError:
    return MissingExtraError(f"{module.split('.')[0]} is not installed; install the {extra} extra from the "
                             f"fvdiffusion clone: pip install -e '.[{extra}]'")


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise MissingExtraError naming ``pip install -e '.[extra]'`` (fvdiffusion is
    installed from its repository, not from a package index)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra) from exc


def require_installed(module: str, extra: str) -> None:
    """MissingExtraError now if ``module`` cannot be found, without importing it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(module, extra)


def prompt_from(cond: Any, who: str) -> str:
    if not isinstance(cond, str):
        raise ValueError(f"{who} scores an image against a prompt: pass the prompt string as cond, got {type(cond).__name__}")
    return cond


def preprocess(images: Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
               crop: tuple[int, int] | None = None, mode: str = "bicubic") -> Tensor:
    """CLIP-style input: short side resized to ``size`` (antialiased), centre crop (``crop``, default
    ``size`` × ``size``), normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    crop_h, crop_w = crop if crop is not None else (size, size)
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    top, left = max(new_h - crop_h, 0) // 2, max(new_w - crop_w, 0) // 2
    x = x[..., top : top + crop_h, left : left + crop_w].clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _features(output: Any) -> Tensor:
    # transformers < 5 returns the projected features, >= 5 a model output with them as pooler_output
    return output if isinstance(output, Tensor) else output.pooler_output


# --- the image processor's settings ---------------------------------------------------------

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processor configs store them


@dataclass(frozen=True)
class ImageSettings:
    """What a CLIP image processor does, applied in torch: resize the short side, centre crop, normalise."""

    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, config: dict[str, Any], fallback: int) -> ImageSettings:
        size = config.get("size", fallback)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", fallback), size.get("width", fallback))
        crop = config.get("crop_size", size) if config.get("do_center_crop", True) else size
        if isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            crop = (crop, crop)
        normalise = config.get("do_normalize", True)
        return cls(size=int(size), crop=tuple(crop),
                   mean=tuple(config.get("image_mean", CLIP_MEAN)) if normalise else (0.0, 0.0, 0.0),
                   std=tuple(config.get("image_std", CLIP_STD)) if normalise else (1.0, 1.0, 1.0),
                   mode=_RESAMPLE.get(config.get("resample", 3), "bicubic"))


def _image_settings(transformers: Any, source: PathLike, fallback: int, *, who: str, arg: str,
                    revision: str | None, download: bool) -> ImageSettings:
    """The image processor config of ``source`` (a local directory or hub id), or OpenAI CLIP's settings
    at the model's image size when there is none to be had (the model and tokenizer did load)."""
    def load(name: str, **kwargs: Any) -> dict[str, Any]:
        return transformers.ImageProcessingMixin.get_image_processor_dict(name, **kwargs)[0]

    where = locate(source, who=who, arg=arg)
    if isinstance(where, Path) and not any((where / name).is_file() for name in _PROCESSOR_FILES):
        return ImageSettings(size=fallback, crop=(fallback, fallback))
    try:
        config = load_pretrained(load, source, who=who, arg=arg, what="image processor config",
                                 revision=revision, download=download)
    except MissingWeightsError:  # none in the repository, or a cached hub id without it while offline
        return ImageSettings(size=fallback, crop=(fallback, fallback))
    return ImageSettings.from_processor(config, fallback)


def has_tokenizer(source: PathLike) -> bool:
    """Whether ``source`` is a local directory holding tokenizer files (no hub request)."""
    path = Path(os.fspath(source)).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


# --- CLIP: CLIPScore and PickScore share it -------------------------------------------------

class _ClipBackbone:
    """A transformers CLIPModel with its processor's tokenizer and image settings, batched in torch.

    ``processor`` (default: ``model``) is where the tokenizer and the image processor config
    come from; ``revision`` / ``processor_revision`` pin hub ids. ``model_arg`` and
    ``processor_arg`` are the caller's argument names, for error messages.
    """

    def __init__(self, model: PathLike, *, who: str, extra: str, device: str | torch.device | None,
                 processor: PathLike | None = None, revision: str | None = None,
                 processor_revision: str | None = None, download: bool = True,
                 model_arg: str = "model", processor_arg: str = "processor") -> None:
        if processor is None:
            processor, processor_revision, processor_arg = model, revision, model_arg
        # what can fail before any request fails before transformers is imported (most of the time otherwise)
        require_installed("transformers", extra)
        preflight(model, who=who, arg=model_arg, what="CLIP model", download=download)
        preflight(processor, who=who, arg=processor_arg, what="tokenizer", download=download)
        transformers = require("transformers", extra)
        self.model = load_pretrained(
            lambda name, **kw: transformers.CLIPModel.from_pretrained(name, use_safetensors=True, **kw),
            model, who=who, arg=model_arg, what="CLIP model", revision=revision, download=download,
        ).eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = load_pretrained(
            lambda name, **kw: transformers.AutoTokenizer.from_pretrained(name, **kw),
            processor, who=who, arg=processor_arg, what="tokenizer", revision=processor_revision, download=download,
        )
        self.image = _image_settings(transformers, processor, int(self.model.config.vision_config.image_size),
                                     who=who, arg=processor_arg, revision=processor_revision, download=download)
        self._text_cache: tuple[str, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        s = self.image
        pixels = preprocess(images.to(self.device), s.size, s.mean, s.std, crop=s.crop, mode=s.mode)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompt: str) -> Tensor:
        if self._text_cache is None or self._text_cache[0] != prompt:
            tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(self.device)
            feats = _features(self.model.get_text_features(**tokens)).float()
            self._text_cache = (prompt, F.normalize(feats, dim=-1))
        return self._text_cache[1]


class CLIPScore:
    """100 · cos(CLIP image embedding, CLIP text embedding of the prompt) (transformers CLIP).

    Unlike the CLIPScore metric this is not clipped at 0, so that selection still sees a
    signal among poorly matching images. ``model`` is a local directory (used as it is) or a
    hub id holding a CLIPModel (safetensors weights), its tokenizer and (optionally) its image
    processor config; ``processor`` takes those from elsewhere; ``revision`` pins a hub id;
    ``download=False`` never contacts the hub.
    """

    name = "clip"

    def __init__(self, model: PathLike = DEFAULT_CLIP, device: str | torch.device | None = None,
                 revision: str | None = None, *, processor: PathLike | None = None, download: bool = True) -> None:
        self.clip = _ClipBackbone(model, who="CLIPScore", extra="clip", device=device, processor=processor,
                                  revision=revision, download=download)

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        text = self.clip.text_features(prompt_from(cond, "CLIPScore"))
        return (100.0 * self.clip.image_features(images) @ text[0]).to(images.device)


class PickScore:
    """PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences (Pick-a-Pic).

    The score is the model's scaled logit ``exp(logit_scale) · cos(image, prompt)`` (about
    20–23 on real images), as in the authors' reference code. ``model`` is the checkpoint
    (``yuvalkirstain/PickScore_v1``, or a local directory of it: a CLIPModel with safetensors
    weights); ``processor`` its tokenizer and image processor (by default the model's own
    directory when it holds a tokenizer, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the
    processor the authors pair it with). Offline, pass both as local directories.
    """

    name = "pickscore"

    def __init__(self, model: PathLike = DEFAULT_PICKSCORE, processor: PathLike | None = None,
                 device: str | torch.device | None = None, revision: str | None = None,
                 processor_revision: str | None = None, *, download: bool = True) -> None:
        if processor is None and not has_tokenizer(model):
            processor = DEFAULT_PICKSCORE_PROCESSOR
        self.clip = _ClipBackbone(model, who="PickScore", extra="pickscore", device=device, processor=processor,
                                  revision=revision, processor_revision=processor_revision, download=download)
        self.scale = float(self.clip.model.logit_scale.detach().float().exp())

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        text = self.clip.text_features(prompt_from(cond, "PickScore"))
        return (self.scale * self.clip.image_features(images) @ text[0]).to(images.device)


# --- the LAION aesthetic predictor -----------------------------------------------------------

_AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the LAION MLP; dropouts sit between them
AESTHETIC_KEYS = tuple(f"layers.{i}.{p}" for i in _AESTHETIC_LAYERS for p in ("weight", "bias"))
_PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle"}
# The published predictor is 3.7 MB (0.93 M float32 values); these bounds leave room for wider
# CLIPs while refusing a small file that would expand in memory (a zip entry, or a tensor that is
# a stride-0 view of a few values, as large as it likes once made contiguous).
MAX_CONVERT_BYTES = 256 * 2**20
MAX_AESTHETIC_VALUES = 64 * 2**20


def _is_pickle(path: Path) -> bool:
    """A torch.save file (zip archive or bare pickle) by its name or first bytes; nothing is unpickled."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _check_aesthetic_state(state: Any, source: Path, error: type[Exception] = ValueError) -> dict[str, Tensor]:
    """The predictor's state dict: exactly its ten keys, floating tensors whose shapes chain to one output."""
    if not isinstance(state, dict):
        raise error(f"{source}: expected a state dict (keys {', '.join(AESTHETIC_KEYS[:2])}, ...), got {type(state).__name__}")
    if set(state) != set(AESTHETIC_KEYS):
        raise error(f"{source.name}: expected keys {sorted(AESTHETIC_KEYS)}, got {sorted(map(str, state))}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor) or not v.is_floating_point()]
    if bad:
        raise error(f"{source}: {bad[0]} is a {type(state[bad[0]]).__name__}, not a floating-point tensor")
    total = sum(state[k].numel() for k in AESTHETIC_KEYS)
    if total > MAX_AESTHETIC_VALUES:
        raise error(f"{source}: {total:,} values in all, more than an aesthetic predictor holds "
                    f"(at most {MAX_AESTHETIC_VALUES:,}; the published one has 0.93 M)")
    for k in AESTHETIC_KEYS:
        tensor = state[k]  # a view must not claim more values than its storage holds
        if tensor.numel() and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            raise error(f"{source}: {k} claims {tensor.numel():,} values but its storage holds "
                        f"{tensor.untyped_storage().nbytes() // tensor.element_size():,} (an expanded view)")
    width = None
    for i in _AESTHETIC_LAYERS:
        weight, bias = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        if weight.ndim != 2 or bias.shape != weight.shape[:1] or (width is not None and weight.shape[1] != width):
            raise error(f"{source}: layers.{i} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, "
                        f"which do not follow {'the previous layer' if width else 'a Linear layer'}")
        width = weight.shape[0]
    if width != 1:
        raise error(f"{source}: the last layer has {width} outputs, expected 1 (a score)")
    for k in AESTHETIC_KEYS:
        bad = int((~torch.isfinite(state[k])).sum())
        if bad:
            raise error(f"{source}: {k} has {bad} non-finite value(s) (NaN or inf) of {state[k].numel()}: "
                        "the predictor would score every image NaN")
    return {k: state[k] for k in AESTHETIC_KEYS}


def convert_aesthetic(src: PathLike, dst: PathLike) -> Path:
    """Convert the published LAION aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``, a
    ``torch.save`` pickle) to a safetensors file that :class:`AestheticScore` loads; returns ``dst``.

    The pickle is read once, here, with ``torch.load(weights_only=True)``: torch's restricted
    unpickler builds only tensors, storages and plain containers from an allow-list and refuses
    any other global (a pickle that would run code is refused, not run; torch >= 2.6, this
    project's floor, fixed the known way around it, CVE-2025-32434). The result must then be
    exactly the predictor's state dict of floating tensors, else :class:`ConversionError`.
    The output is written atomically; ``dst`` must end in ``.safetensors``.
    """
    from safetensors.torch import save

    from fvdiffusion.durable import write_atomically

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ConversionError(f"{dst}: the output must be a .safetensors file")
    if not src.is_file():
        raise MissingWeightsError(f"{src}: no such file (the predictor's .pth, e.g. sac+logos+ava1-l14-linearMSE.pth)")
    _check_convert_size(src)
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            zipfile.BadZipFile) as exc:
        raise ConversionError(f"{src}: refused: not a plain state dict of tensors "
                              f"(torch.load(weights_only=True) said: {first_line(exc)})") from None
    state = _check_aesthetic_state(state, src, ConversionError)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)  # --out may name a folder still to be made, as elsewhere
    write_atomically(dst, save(tensors, metadata={"format": "pt", "converted_from": src.name}))
    return dst


def _check_convert_size(src: Path) -> None:
    """Bound what torch.load may allocate: the file, and a zip archive's uncompressed entries."""
    size = src.stat().st_size
    if size > MAX_CONVERT_BYTES:
        raise ConversionError(f"{src}: {size:,} bytes, more than an aesthetic predictor "
                              f"(at most {MAX_CONVERT_BYTES:,}; the published one is 3.7 MB)")
    if zipfile.is_zipfile(src):
        try:
            with zipfile.ZipFile(src) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConversionError(f"{src}: refused: a damaged zip archive ({first_line(exc)})") from None
        if unpacked > MAX_CONVERT_BYTES:
            raise ConversionError(f"{src}: unpacks to {unpacked:,} bytes, more than an aesthetic predictor "
                                  f"(at most {MAX_CONVERT_BYTES:,})")


class AestheticScore:
    """LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP image embedding.

    ``mlp_weights`` is a safetensors file with the predictor's state dict (keys
    ``layers.{0,2,4,6,7}.{weight,bias}``, as in ``sac+logos+ava1-l14-linearMSE``). The
    published file is a pickle, which this reward never loads: convert it once with
    ``fvd convert aesthetic sac+logos+ava1-l14-linearMSE.pth --out aesthetic.safetensors``
    (:func:`convert_aesthetic`). ``clip_model`` must be the CLIP it was trained on (ViT-L/14
    for the LAION predictor): a local directory or a hub id, resolved like ``CLIPScore``'s
    ``model``; ``clip_revision`` pins a hub id. Prompt-free.
    """

    name = "aesthetic"

    def __init__(self, mlp_weights: PathLike, clip_model: PathLike = DEFAULT_CLIP, device: str | torch.device | None = None,
                 clip_revision: str | None = None, *, download: bool = True) -> None:
        safetensors_torch = require("safetensors.torch", "aesthetic")
        path = Path(mlp_weights)
        if not path.is_file():
            raise MissingWeightsError(f"AestheticScore: mlp_weights={str(path)!r}: no such file (a .safetensors file)")
        if _is_pickle(path):
            raise ValueError(f"AestheticScore: {path} is a pickle (torch.save) file, which this reward does not load; "
                             f"convert it once with: fvd convert aesthetic {path} --out {path.with_suffix('.safetensors')}")
        state = _check_aesthetic_state(safetensors_torch.load_file(str(path)), path)
        self.clip = _ClipBackbone(clip_model, who="AestheticScore", extra="aesthetic", device=device,
                                  revision=clip_revision, download=download, model_arg="clip_model")
        self.mlp = _laion_mlp(state).to(self.clip.device).eval()
        embed_dim = state["layers.0.weight"].shape[1]
        projection_dim = int(self.clip.model.config.projection_dim)
        if embed_dim != projection_dim:
            raise ValueError(f"aesthetic MLP expects {embed_dim}-d CLIP embeddings, {os.fspath(clip_model)!r} gives {projection_dim}-d")

    @torch.no_grad()
    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        return self.mlp(self.clip.image_features(images)).squeeze(-1).to(images.device)


def _laion_mlp(state: dict[str, Tensor]) -> torch.nn.Sequential:
    """The predictor's layer stack with sizes read from the weights (dropout is inert at eval)."""
    def linear(i: int) -> torch.nn.Linear:
        out_f, in_f = state[f"layers.{i}.weight"].shape
        return torch.nn.Linear(in_f, out_f)

    mlp = torch.nn.Sequential(
        linear(0), torch.nn.Dropout(0.2), linear(2), torch.nn.Dropout(0.2),
        linear(4), torch.nn.Dropout(0.1), linear(6), linear(7),
    )
    mlp.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    return mlp


# --- ImageReward: not provided ---------------------------------------------------------------

IMAGEREWARD_REMOVED = (
    "ImageReward is not available: its only published weights are a pickled checkpoint for the image-reward "
    "package's own BLIP code, which cannot run on transformers >= 5 (this project's floor) and needs the OpenAI "
    "'clip' package that is not on PyPI; use PickScore (model_rewards.PickScore, fvd t2i --reward pickscore), "
    "also trained on human preferences, or CLIPScore / AestheticScore"
)


class ImageRewardScore:
    """Removed: raises :class:`RewardUnavailableError` saying why and what to use instead (PickScore)."""

    name = "imagereward"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RewardUnavailableError(IMAGEREWARD_REMOVED)
