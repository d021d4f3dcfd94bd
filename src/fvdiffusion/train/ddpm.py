"""The DDPM recipe: eps-prediction on MNIST, linear VP schedule (1000 steps), AdamW, EMA.

No flips or other augmentation: a mirrored digit is not a digit. Every random draw
(batch indices, timesteps, noise) comes from one generator on the training device, and
its state is checkpointed, so a resumed run continues bit-for-bit like an uninterrupted
one on the same device: the loop (:mod:`fvdiffusion.train.resumable`, shared with the other
recipes) checkpoints only at step boundaries, also on Ctrl-C or SIGTERM. The same code runs
on CPU and CUDA (``device``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvdiffusion.schedule import VPSchedule
from fvdiffusion.train.resumable import SEED_MAX, ResumableRun, check_float, check_int
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
        owner = "DDPMTrainConfig"
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "warmup_steps", self.warmup_steps, low=0)
        check_int(owner, "seed", self.seed, low=0, high=SEED_MAX)
        check_float(owner, "lr", self.lr, 0.0, strict=True)
        check_float(owner, "weight_decay", self.weight_decay, 0.0)
        check_float(owner, "ema_decay", self.ema_decay, 0.0, below=1.0)
        check_float(owner, "grad_clip", self.grad_clip, 0.0, strict=True)
        if self.max_minutes is not None:
            check_float(owner, "max_minutes", self.max_minutes, 0.0, strict=True)
        if not isinstance(self.model, UNetConfig):
            raise ValueError(f"{owner}.model must be a UNetConfig, got {type(self.model).__name__}")

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

    meta = {"kind": "ddpm", "config": config.to_dict(), "num_train_images": int(data.shape[0])}
    run = ResumableRun(run_dir, dev, meta, model, optimizer, generator, ema=ema, progress=progress)
    run.start(resume, check=lambda saved: _check_resumable(saved, config, run_dir), command=command)

    def train_step(step: int) -> Tensor:
        idx = torch.randint(data.shape[0], (config.batch_size,), generator=generator, device=dev)
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (config.batch_size,), generator=generator, device=dev)
        eps = torch.randn((config.batch_size, *data.shape[1:]), generator=generator, device=dev)
        loss = ddpm_loss(model, data[idx], t, eps, alphas_cumprod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        return loss

    run.run(config.steps, train_step, lambda step: config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps)),
            log_every=config.log_every, checkpoint_every=config.checkpoint_every, desc="ddpm",
            max_minutes=config.max_minutes)
    path = run.checkpoint()
    return TrainSummary(run_dir, run.step, run.elapsed_s, run.last_loss, path)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _check_resumable(meta: dict, config: DDPMTrainConfig, run_dir: Path) -> None:
    saved = meta.get("config", {})
    if saved.get("model") != config.model.to_dict():
        raise ValueError(f"resume: model config differs from the checkpoint in {run_dir}: {saved.get('model')}")
    if saved.get("seed") != config.seed:
        raise ValueError(f"resume: seed {config.seed} differs from the checkpoint's seed {saved.get('seed')}")
