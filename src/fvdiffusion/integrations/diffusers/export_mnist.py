"""The shipped MNIST DDPM (``zoo.unet.UNet``) as a diffusers ``DDPMPipeline`` folder.

The zoo UNet has exactly ``UNet2DModel``'s DDPM layout (conv_in; ``DownBlock2D`` per level
with ``layers_per_block = num_res_blocks`` and a stride-2 conv downsample except at the last
level; ``UNetMidBlock2D`` resnet-attention-resnet; ``UpBlock2D`` with one more resnet and the
skip concat; nearest upsample + conv; GroupNorm/SiLU/conv_out; sinusoidal time embedding
with ``flip_sin_to_cos=True, freq_shift=0`` and a linear-SiLU-linear MLP) except one thing:
diffusers' ``ResnetBlock2D`` applies SiLU to the time embedding before its ``time_emb_proj``,
the zoo's ``ResBlock`` does not. That is folded exactly (to float rounding): a per-channel
constant ``c`` is added to the bias of the MLP's second linear so that every embedding entry
is >= 30 at every timestep in [0, T) (silu(y) = y - y/(1 + e^y), off by < 3e-12 there), and
``W c`` is subtracted from every resnet's ``time_emb_proj`` bias, so ``W silu(y + c) + b - W c
= W y + b``. The attention's 1x1 ``qkv`` conv splits into ``to_q / to_k / to_v`` (channel
blocks of C, heads contiguous blocks of C / heads in both), ``proj`` becomes ``to_out[0]``;
the scale is dim_head^-0.5 in both.

The scheduler is ``DDPMScheduler(beta_schedule="linear", 1e-4 .. 0.02, 1000 steps,
prediction_type="epsilon", clip_sample=False)``: the zoo's ``VPSchedule.linear(1000)``
(its ᾱ agree to float32 rounding, diffusers keeps them in float32).

diffusers is imported only when a function here runs (MissingExtraError naming the extra if absent).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fvdiffusion.rewards.model_rewards import require

MIN_EMBEDDING = 30.0  # every time-embedding entry after the fold: silu(y) = y to < 3e-12 relative
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def _diffusers() -> Any:
    return require("diffusers", "diffusers")


def unet2d_config(config: Any) -> dict[str, Any]:
    """The ``UNet2DModel`` config of a zoo :class:`~fvdiffusion.zoo.unet.UNetConfig`."""
    widths = [config.base_channels * m for m in config.channel_mults]
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        center_input_sample=False, time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=True,
        down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
        block_out_channels=tuple(widths), layers_per_block=config.num_res_blocks, mid_block_scale_factor=1,
        downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=config.dropout,
        act_fn="silu", attention_head_dim=widths[-1] // config.num_heads, norm_num_groups=config.num_groups,
        norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=bool(config.attention),
    )


@torch.no_grad()
def time_embedding_shift(unet: nn.Module, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Per-channel c >= 0 with min over t in [0, T) of (time_mlp(t) + c) >= MIN_EMBEDDING (float64)."""
    from fvdiffusion.zoo.unet import timestep_embedding

    param = next(unet.parameters())
    t = torch.arange(num_train_timesteps, device=param.device)
    emb = timestep_embedding(t, unet.config.base_channels).double()
    mlp = unet.time_mlp
    y = _linear64(mlp[2], torch.nn.functional.silu(_linear64(mlp[0], emb)))
    return (MIN_EMBEDDING - y.min(dim=0).values).clamp(min=0.0)


def _linear64(linear: nn.Linear, x: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, linear.weight.double(), linear.bias.double())


@torch.no_grad()
def _state_dict(unet: nn.Module, shift: Tensor | None) -> dict[str, Tensor]:
    """The zoo UNet's weights under UNet2DModel's names, the SiLU fold applied (skipped when ``shift`` is None)."""
    cfg = unet.config
    src = {k: v.detach().double() for k, v in unet.state_dict().items()}
    out: dict[str, Tensor] = {}

    def copy(dst: str, name: str) -> None:
        out[f"{dst}.weight"] = src[f"{name}.weight"]
        out[f"{dst}.bias"] = src[f"{name}.bias"]

    def resnet(dst: str, name: str) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            copy(f"{dst}.{part}", f"{name}.{part}")
        weight, bias = src[f"{name}.time.weight"], src[f"{name}.time.bias"]
        out[f"{dst}.time_emb_proj.weight"] = weight
        out[f"{dst}.time_emb_proj.bias"] = bias if shift is None else bias - weight @ shift
        if f"{name}.skip.weight" in src:
            copy(f"{dst}.conv_shortcut", f"{name}.skip")

    copy("time_embedding.linear_1", "time_mlp.0")
    copy("time_embedding.linear_2", "time_mlp.2")
    if shift is not None:
        out["time_embedding.linear_2.bias"] = out["time_embedding.linear_2.bias"] + shift
    copy("conv_in", "stem")
    levels, per = len(cfg.channel_mults), cfg.num_res_blocks
    for level in range(levels):
        for j in range(per):
            resnet(f"down_blocks.{level}.resnets.{j}", f"down.{level * per + j}")
        if level < levels - 1:
            copy(f"down_blocks.{level}.downsamplers.0.conv", f"downsample.{level}")
    resnet("mid_block.resnets.0", "mid1")
    resnet("mid_block.resnets.1", "mid2")
    if cfg.attention:
        attn, c = "mid_block.attentions.0", cfg.base_channels * cfg.channel_mults[-1]
        copy(f"{attn}.group_norm", "mid_attn.norm")
        qkv_w, qkv_b = src["mid_attn.qkv.weight"][:, :, 0, 0], src["mid_attn.qkv.bias"]
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{attn}.{part}.weight"] = qkv_w[i * c:(i + 1) * c]
            out[f"{attn}.{part}.bias"] = qkv_b[i * c:(i + 1) * c]
        out[f"{attn}.to_out.0.weight"] = src["mid_attn.proj.weight"][:, :, 0, 0]
        out[f"{attn}.to_out.0.bias"] = src["mid_attn.proj.bias"]
    for u in range(levels):
        for j in range(per + 1):
            resnet(f"up_blocks.{u}.resnets.{j}", f"up.{u * (per + 1) + j}")
        if u < levels - 1:
            copy(f"up_blocks.{u}.upsamplers.0.conv", f"upsample.{u}")
    copy("conv_norm_out", "head.0")
    copy("conv_out", "head.2")
    return out


@torch.no_grad()
def zoo_unet_to_unet2d(unet: nn.Module, *, fold_silu: bool = True, dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers ``UNet2DModel`` computing the zoo ``unet``'s eps(x, t) (eval mode, on CPU).

    The fold is computed in float64 and the weights are then stored in ``dtype`` (float64 shows
    the conversion exact to ~1e-13; float32 rounds the folded biases). ``fold_silu=False``
    skips the time-embedding fold (only to show that it is needed).
    """
    diffusers = _diffusers()
    model = diffusers.UNet2DModel(**unet2d_config(unet.config))
    if dtype != torch.float32:
        model = model.to(dtype)
    shift = time_embedding_shift(unet) if fold_silu else None
    weights = _state_dict(unet, None if shift is None else shift.cpu())
    target = model.state_dict()
    missing = sorted(set(target) - set(weights))
    extra = sorted(set(weights) - set(target))
    if missing or extra:
        raise ValueError(f"zoo UNet -> UNet2DModel: unmapped keys {missing[:4]} / unknown keys {extra[:4]}")
    model.load_state_dict({k: v.to(dtype).cpu().reshape(target[k].shape) for k, v in weights.items()})
    return model.eval().requires_grad_(False)


def ddpm_scheduler() -> Any:
    """The zoo's linear VP schedule (``VPSchedule.linear(1000)``) as a ``DDPMScheduler`` (eps, no clipping)."""
    diffusers = _diffusers()
    return diffusers.DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START,
                                   beta_end=BETA_END, beta_schedule="linear", prediction_type="epsilon",
                                   clip_sample=False, variance_type="fixed_small")


def export_ddpm_pipeline(out_dir: str | Path, weights: str | Path | None = None) -> Path:
    """Write the shipped MNIST DDPM (or the zoo ``weights`` file) as a ``DDPMPipeline`` folder (safetensors)."""
    diffusers = _diffusers()
    from fvdiffusion.zoo.loaders import load_module

    unet = load_module("ddpm", weights, "cpu")
    pipe = diffusers.DDPMPipeline(unet=zoo_unet_to_unet2d(unet), scheduler=ddpm_scheduler())
    out = Path(out_dir)
    write_folder_atomically(out, lambda staging: pipe.save_pretrained(staging, safe_serialization=True))
    return out


def write_folder_atomically(out: Path, write: Any) -> None:
    """``write(folder)`` into a hidden sibling of ``out``, then swap it into place: a kill or a full
    disk leaves ``out`` as it was (absent, or the previous export), never half written, and no
    staging folder behind. A failed write is one error naming ``out``."""
    import shutil

    from fvdiffusion.durable import fsync_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    backup = out.parent / f".{out.name}.previous-{os.getpid()}"
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write(staging)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            os.rename(out, backup)  # the previous export, until the new one is in place
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if backup.exists() and not out.exists():
            os.rename(backup, out)
        if isinstance(exc, OSError) or type(exc).__module__.startswith("safetensors"):
            # a full disk, a size limit: name the folder, not a staged file nobody will see
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            raise OSError(f"{out}: writing the pipeline failed, nothing written: {reason}") from None
        raise
    shutil.rmtree(backup, ignore_errors=True)


class DigitImageReward:
    """A reward on MNIST digits in the model's range (e.g. ``ClassifierReward``) as an ``align()`` image reward.

    The zoo's digits are [-1, 1] single-channel (``zoo.mnist_data``); ``align()`` on the exported
    ``DDPMPipeline`` hands an image reward its x̂0 as (x̂0 + 1) / 2 clamped to [0, 1]
    (``PixelImageReward``), still [B, 1, 28, 28]. This maps such images back with 2 * image - 1, so
    ``align(pipe, None, DigitImageReward(r))`` scores the clamped x̂0 as ``r`` does natively
    (``ClassifierReward`` clamps to [-1, 1] itself; the round trip is exact to float rounding).
    """

    def __init__(self, digit_reward: Any) -> None:
        self.digit_reward = digit_reward
        self.name = getattr(digit_reward, "name", type(digit_reward).__name__)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompt: Any = None) -> Tensor:
        return self.digit_reward(images * 2 - 1)
