"""``fvd t2i``'s rewards by name: which model paths each takes, how it is built, and a probe on
the pipeline's own image shape before anything is sampled.

A reward that cannot score the pipeline's images (``brightness`` on the exported MNIST DDPM's
1-channel digits, say) used to fail only after the first population had been sampled; here it is
built and called once on two grey images of the pipeline's shape, and a failure is one line
naming the flag, the reward and the shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fvdiffusion.errors import RunnerError, exception_line
from fvdiffusion.rewards import image_rewards, model_rewards
from fvdiffusion.rewards.calling import call_reward

PROBE_IMAGES = 2


@dataclass(frozen=True)
class RewardSpec:
    """How ``fvd t2i`` builds one named reward."""

    build: Callable[[Optional[str], Optional[str], Any], Any]  # (reward_model, clip_model, device) -> reward
    model_help: Optional[str] = None  # what --reward-model is for this reward (None: it takes none)
    clip_help: Optional[str] = None   # what --clip-model is for this reward (None: it takes none)


def _aesthetic(reward_model: Optional[str], clip_model: Optional[str], device: Any) -> Any:
    if reward_model is None:
        raise RunnerError("--reward aesthetic needs --reward-model PATH to the predictor's .safetensors weights")
    return model_rewards.AestheticScore(reward_model, clip_model or model_rewards.DEFAULT_CLIP, device=device)


def _digit(reward_model: Optional[str], clip_model: Optional[str], device: Any) -> Any:
    """log p(class C | image) from the shipped MNIST classifier, on [0, 1] images (the exported DDPM's)."""
    text = (reward_model or "").strip()
    if not re.fullmatch(r"[0-9]", text):
        raise RunnerError(f"--reward digit needs --reward-model C, the target class 0..9, got {reward_model!r}")
    from fvdiffusion.integrations.diffusers.export_mnist import DigitImageReward
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_reward_classifier

    return DigitImageReward(ClassifierReward(load_reward_classifier(device=device), int(text)))


# model-backed rewards import their extra only when built
REWARDS: dict[str, RewardSpec] = {
    "brightness": RewardSpec(lambda m, c, device: image_rewards.Brightness()),
    "colourfulness": RewardSpec(lambda m, c, device: image_rewards.Colourfulness()),
    "jpeg": RewardSpec(lambda m, c, device: image_rewards.JpegCompressibility()),
    "clip": RewardSpec(lambda m, c, device: model_rewards.CLIPScore(m or model_rewards.DEFAULT_CLIP, device=device),
                       model_help="the CLIP model's directory or hub id"),
    "aesthetic": RewardSpec(_aesthetic, model_help="the predictor's .safetensors",
                            clip_help="its CLIP backbone's directory or hub id"),
    "pickscore": RewardSpec(lambda m, c, device: model_rewards.PickScore(m or model_rewards.DEFAULT_PICKSCORE,
                                                                         processor=c, device=device),
                            model_help="the PickScore model's directory or hub id",
                            clip_help="its tokenizer and image processor's directory or hub id"),
    "digit": RewardSpec(_digit, model_help="the target class 0..9"),
}
# names that once were rewards: the message says why they are gone and what to use instead
REMOVED_REWARDS = {"imagereward": model_rewards.IMAGEREWARD_REMOVED}


def check_reward_name(flag: str, name: str) -> None:
    if name in REMOVED_REWARDS:
        raise RunnerError(f"{flag} {name}: {REMOVED_REWARDS[name]}")
    if name not in REWARDS:
        raise RunnerError(f"{flag}: unknown reward {name!r}; expected one of {', '.join(REWARDS)}")


def check_reward_paths(flag: str, name: str, model: Optional[str], clip: Optional[str],
                       model_flag: str, clip_flag: str) -> None:
    """A path given to a reward that takes none is one line, not silently ignored."""
    spec = REWARDS[name]
    if model is not None and spec.model_help is None:
        takes = [n for n, s in REWARDS.items() if s.model_help]
        raise RunnerError(f"{model_flag} {model!r}: {flag} {name} takes no model (rewards that do: {', '.join(takes)})")
    if clip is not None and spec.clip_help is None:
        takes = [n for n, s in REWARDS.items() if s.clip_help]
        raise RunnerError(f"{clip_flag} {clip!r}: {flag} {name} takes no CLIP model (rewards that do: "
                          f"{', '.join(takes)})")


def build_reward(name: str, reward_model: Optional[str], clip_model: Optional[str], device: Any) -> Any:
    return REWARDS[name].build(reward_model, clip_model, device)


def pipeline_image_shape(pipe: Any, height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
    """(C, H, W) of the images ``align()`` hands a reward for ``pipe``: the VAE's output at the
    requested or default size, or a pixel pipeline's UNet samples."""
    vae = getattr(pipe, "vae", None)
    unet = getattr(pipe, "unet", None)
    if vae is None:  # a pixel pipeline: the samples are the images
        config = unet.config
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.in_channels), int(h), int(w)
    scale = int(pipe.vae_scale_factor)
    if unet is not None:
        size = unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        default_h, default_w = default_h * scale, default_w * scale
    else:  # SD3 / FLUX: the transformer pipelines' default
        default_h = default_w = int(pipe.default_sample_size) * scale
    return int(vae.config.out_channels), int(height or default_h), int(width or default_w)


def probe_reward(flag: str, name: str, reward: Any, shape: tuple[int, int, int], device: Any,
                 prompt: Optional[str]) -> None:
    """Call ``reward`` once on grey images of ``shape``; anything it cannot do is one line now."""
    images = torch.full((PROBE_IMAGES, *shape), 0.5, device=device)
    try:
        with torch.no_grad():
            call_reward(reward, images, prompt)
    except Exception as exc:
        raise RunnerError(f"{flag} {name} cannot score this pipeline's images ([{PROBE_IMAGES}, "
                          f"{', '.join(map(str, shape))}] in [0, 1]): {exception_line(exc)}") from None
