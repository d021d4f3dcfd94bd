"""Rewards backed by pretrained models: ImageReward, CLIP score, LAION aesthetic predictor.

Each is an optional extra, imported only when the reward is built; a missing package raises
:class:`MissingExtraError` (an ImportError) naming the extra to install, and weights that can
be neither found locally nor downloaded raise :class:`MissingWeightsError` (an OSError).
Hub models load safetensors weights only (``use_safetensors=True``: a model shipping only
pickled ``.bin`` weights is refused) and take an optional ``revision`` to pin a commit.
Like the weight-free rewards, each takes images [B, 3, H, W] in [0, 1] and returns [B];
the prompt-aware ones take the prompt string as ``cond``. Preprocessing (resize, centre
crop, normalise) runs in torch on the batch, so rewards stay on the device and batched.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from fvdiffusion.errors import MissingExtraError, MissingWeightsError

# OpenAI CLIP's normalisation, shared by ImageReward's BLIP preprocessing
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise MissingExtraError naming ``pip install 'fvdiffusion[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module.split('.')[0]} is not installed; install it with: pip install 'fvdiffusion[{extra}]'"
        ) from exc


def prompt_from(cond: Any, who: str) -> str:
    if not isinstance(cond, str):
        raise ValueError(f"{who} scores an image against a prompt: pass the prompt string as cond, got {type(cond).__name__}")
    return cond


def preprocess(images: Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """CLIP-style input: short side resized to ``size`` (bicubic, antialiased), centre crop, normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _features(output: Any) -> Tensor:
    # transformers < 5 returns the projected features, >= 5 a model output with them as pooler_output
    return output if isinstance(output, Tensor) else output.pooler_output


def _load_pretrained(loader: Any, name_or_path: str | Path, revision: str | None = None, weights: bool = True) -> Any:
    """``loader.from_pretrained`` with safetensors weights only (``weights``: a model, not a tokenizer) and
    an optional hub ``revision`` (a commit hash, branch or tag; ignored for a local directory)."""
    kwargs: dict[str, Any] = {"use_safetensors": True} if weights else {}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return loader.from_pretrained(str(name_or_path), **kwargs)
    except OSError as exc:
        raise MissingWeightsError(
            f"could not load {str(name_or_path)!r} (neither a local directory nor reachable on the Hugging Face hub, "
            f"or no safetensors weights): {exc}"
        ) from exc


class _ClipBackbone:
    """A transformers CLIPModel (+ tokenizer) with batched tensor preprocessing."""

    def __init__(self, name_or_path: str | Path, extra: str, device: str | torch.device | None,
                 revision: str | None = None) -> None:
        transformers = require("transformers", extra)
        self.model = _load_pretrained(transformers.CLIPModel, name_or_path, revision).eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = _load_pretrained(transformers.AutoTokenizer, name_or_path, revision, weights=False)
        self.image_size = int(self.model.config.vision_config.image_size)
        self._text_cache: tuple[str, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        pixels = preprocess(images.to(self.device), self.image_size).to(self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

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
    signal among poorly matching images. ``model`` is a hub id or a local directory holding
    a CLIPModel (safetensors weights) and its tokenizer; ``revision`` pins a hub id.
    """

    name = "clip"

    def __init__(self, model: str | Path = DEFAULT_CLIP, device: str | torch.device | None = None,
                 revision: str | None = None) -> None:
        self.clip = _ClipBackbone(model, "clip", device, revision)

    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        text = self.clip.text_features(prompt_from(cond, "CLIPScore"))
        return (100.0 * self.clip.image_features(images) @ text[0]).to(images.device)


_AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the LAION MLP; dropouts sit between them


class AestheticScore:
    """LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP image embedding.

    ``mlp_weights`` is a safetensors file with the predictor's state dict (keys
    ``layers.{0,2,4,6,7}.{weight,bias}``, as in ``sac+logos+ava1-l14-linearMSE``); the
    published file is a pickle, which this library does not load — convert it once with
    ``safetensors.torch.save_file(torch.load(path, weights_only=True), out)``. ``clip_model``
    must be the CLIP it was trained on (ViT-L/14 for the LAION predictor); ``clip_revision``
    pins it when it is a hub id. Prompt-free.
    """

    name = "aesthetic"

    def __init__(self, mlp_weights: str | Path, clip_model: str | Path = DEFAULT_CLIP, device: str | torch.device | None = None,
                 clip_revision: str | None = None) -> None:
        safetensors_torch = require("safetensors.torch", "aesthetic")
        path = Path(mlp_weights)
        if not path.is_file():
            raise MissingWeightsError(f"aesthetic predictor weights not found: {str(path)!r} (a .safetensors file)")
        state = safetensors_torch.load_file(str(path))
        expected = {f"layers.{i}.{p}" for i in _AESTHETIC_LAYERS for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(f"{path.name}: expected keys {sorted(expected)}, got {sorted(state)}")
        self.clip = _ClipBackbone(clip_model, "aesthetic", device, clip_revision)
        self.mlp = _laion_mlp(state).to(self.clip.device).eval()
        embed_dim = state["layers.0.weight"].shape[1]
        projection_dim = int(self.clip.model.config.projection_dim)
        if embed_dim != projection_dim:
            raise ValueError(f"aesthetic MLP expects {embed_dim}-d CLIP embeddings, {clip_model!r} gives {projection_dim}-d")

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
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return mlp


class ImageRewardScore:
    """ImageReward (Xu et al. 2023): BLIP image–text features scored by a human-preference MLP.

    Uses the ``image-reward`` package's model (``ImageReward.load``, which downloads its own
    checkpoint and reads it with ``torch.load``: under torch >= 2.6, this project's floor,
    that is ``weights_only=True`` by default, so the pickle cannot run code; the package has
    no revision pin) but runs the forward pass on tensor batches: images are
    resized to 224 in torch instead of through PIL, so scores differ from the package's
    ``model.score`` on files by resampling differences only.
    """

    name = "imagereward"
    image_size = 224
    max_prompt_tokens = 35  # as in the package

    def __init__(self, model: str = "ImageReward-v1.0", device: str | torch.device | None = None,
                 download_root: str | None = None) -> None:
        package = require("ImageReward", "imagereward")
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = package.load(model, device=str(device), download_root=download_root).eval()
        except OSError as exc:
            raise MissingWeightsError(f"could not load ImageReward weights {model!r}: {exc}") from exc
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        prompt = prompt_from(cond, "ImageRewardScore")
        blip = self.model.blip
        pixels = preprocess(images.to(self.device), self.image_size)
        image_embeds = blip.visual_encoder(pixels)
        n = image_embeds.shape[0]
        text = blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=self.max_prompt_tokens,
                              return_tensors="pt").to(self.device)
        out = blip.text_encoder(
            text.input_ids.expand(n, -1), attention_mask=text.attention_mask.expand(n, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            return_dict=True,
        )
        scores = self.model.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return ((scores - self.model.mean) / self.model.std).to(images.device)
