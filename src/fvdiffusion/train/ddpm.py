"""The DDPM recipe: eps-prediction on MNIST, linear VP schedule (1000 steps), AdamW, EMA.

No flips or other augmentation: a mirrored digit is not a digit. Every random draw
(batch indices, timesteps, noise) comes from one generator on the training device, and
its state is checkpointed, so a resumed run continues bit-for-bit like an uninterrupted
one on the same device. The same code runs on CPU and CUDA (``device``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fvdiffusion.schedule import VPSchedule
from fvdiffusion.train.checkpoint import (
    LossWindow, device_label, has_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint,
)
from fvdiffusion.zoo.unet import UNet, UNetConfig

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DDPMTrainConfig:
    steps: int = 30_000
    batch_size: int = 128
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 25
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall time
    model: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DDPMTrainConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"DDPMTrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"DDPMTrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"DDPMTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"DDPMTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"DDPMTrainConfig.grad_clip must be > 0, got {self.grad_clip!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"DDPMTrainConfig.max_minutes must be > 0, got {self.max_minutes!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = self.model.to_dict()
        return out


@dataclass(frozen=True)
class TrainSummary:
    run_dir: Path
    step: int
    elapsed_s: float
    loss: float | None  # mean training loss over the last logging window
    checkpoint: Path


def ddpm_loss(model: nn.Module, x0: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Mean-squared eps error at x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    return F.mse_loss(model(x_t, t), eps)


def train_ddpm(
    config: DDPMTrainConfig,
    run_dir: Path,
    images: Tensor | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> TrainSummary:
    """Train (or, with ``resume``, continue) up to ``config.steps`` steps; checkpoint into ``run_dir``.

    ``images`` defaults to the MNIST train split ([N, 1, 28, 28] in [-1, 1]).
    """
    run_dir = Path(run_dir)
    dev = torch.device(device)
    if images is None:
        from fvdiffusion.zoo.mnist_data import load_mnist

        images = load_mnist("train").images
    data = images.to(dev, torch.float32)
    if dev.type == "cuda":
        # speed over bit-reproducibility on GPUs (CPU runs stay exactly reproducible)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(config.seed)
    model = UNet(config.model).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    alphas_cumprod = VPSchedule.linear(NUM_TRAIN_TIMESTEPS).alphas_cumprod.to(dev, torch.float32)

    step, elapsed_before, last_loss = 0, 0.0, None
    meta = {"kind": "ddpm", "config": config.to_dict(), "num_train_images": int(data.shape[0])}
    if not resume and has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if resume and has_checkpoint(run_dir):
        ckpt = load_checkpoint(run_dir)
        _check_resumable(ckpt.meta, config, run_dir)
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        restore_optimizer(optimizer, ckpt.optimizer_state)
        generator.set_state(ckpt.rng_state)
        step, elapsed_before = ckpt.step, float(ckpt.meta.get("elapsed_s", 0.0))
        last_loss = ckpt.meta.get("loss")
        meta["command"] = ckpt.meta.get("command")
    if command:
        meta["command"] = command

    start = time.monotonic()
    window = LossWindow(dev)
    bar = tqdm(total=config.steps, initial=step, desc="ddpm", disable=not progress, dynamic_ncols=True)

    def checkpoint() -> Path:
        elapsed = elapsed_before + time.monotonic() - start
        info = {**meta, "elapsed_s": round(elapsed, 1), "device": device_label(dev), "loss": last_loss}
        return save_checkpoint(run_dir, step, info, model, optimizer, generator, ema=ema)

    model.train()
    try:
        while step < config.steps:
            if config.max_minutes is not None and time.monotonic() - start > 60 * config.max_minutes:
                break
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            idx = torch.randint(data.shape[0], (config.batch_size,), generator=generator, device=dev)
            t = torch.randint(NUM_TRAIN_TIMESTEPS, (config.batch_size,), generator=generator, device=dev)
            eps = torch.randn((config.batch_size, *data.shape[1:]), generator=generator, device=dev)
            loss = ddpm_loss(model, data[idx], t, eps, alphas_cumprod)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)

            window.add(loss)
            if step % config.log_every == 0 or step == config.steps:
                last_loss = window.report(run_dir, bar, step, elapsed_before + time.monotonic() - start)
            if step % config.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM mapped to KeyboardInterrupt by the CLI: keep the finished steps
        checkpoint()
        raise
    finally:
        bar.close()
    path = checkpoint()
    return TrainSummary(run_dir, step, elapsed_before + time.monotonic() - start, last_loss, path)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _check_resumable(meta: dict, config: DDPMTrainConfig, run_dir: Path) -> None:
    if meta.get("kind") != "ddpm":
        raise ValueError(f"resume: {run_dir} holds a {meta.get('kind')!r} checkpoint, not a ddpm one")
    saved = meta.get("config", {})
    if saved.get("model") != config.model.to_dict():
        raise ValueError(f"resume: model config differs from the checkpoint in {run_dir}: {saved.get('model')}")
    if saved.get("seed") != config.seed:
        raise ValueError(f"resume: seed {config.seed} differs from the checkpoint's seed {saved.get('seed')}")
