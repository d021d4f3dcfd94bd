"""The feature-network recipe: an autoencoder on clean train digits, no augmentation at all.

No augmentation on purpose: the latent must keep slant, position, size and stroke (what the
evaluation network was trained to ignore), so a set of a few digits repeated lands far from
the real class in this space. Pixel MSE on [-1, 1], AdamW with warm-up and cosine decay.
The reference split is only scored at the end (reconstruction MSE), never used for choices.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fvdiffusion.train.checkpoint import (
    LossWindow, device_label, has_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint,
)
from fvdiffusion.train.classifier import warmup_cosine_lr
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig

RUN_KIND = "feature_net"


@dataclass(frozen=True)
class FeatureNetTrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 3  # differs from the reward classifier (1) and the eval net (2)
    checkpoint_every: int = 500
    log_every: int = 50
    model: FeatureNetConfig = FeatureNetConfig()

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureNetTrainConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"FeatureNetTrainConfig.warmup_steps must be an int in [0, steps), got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"FeatureNetTrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"FeatureNetTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.to_dict()}


@dataclass(frozen=True)
class FeatureNetSummary:
    run_dir: Path
    step: int
    elapsed_s: float
    loss: float | None
    reference_mse: float | None  # None when no reference images were given
    checkpoint: Path


@torch.no_grad()
def reconstruction_mse(model: FeatureNet, images: Tensor, batch_size: int = 500) -> float:
    """Mean per-pixel squared error of the reconstruction, on [-1, 1] images."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(dev, torch.float32)
        total += F.mse_loss(model(x), x, reduction="sum").item()
    model.train(was_training)
    return total / images[0].numel() / images.shape[0]


def train_feature_net(
    config: FeatureNetTrainConfig,
    run_dir: Path,
    train: Tensor | None = None,
    reference: Tensor | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> FeatureNetSummary:
    """Train (or continue) the autoencoder; ``train``/``reference`` default to the MNIST splits' images.

    Pass ``reference=None`` together with an explicit ``train`` to skip the final scoring.
    """
    run_dir = Path(run_dir)
    dev = torch.device(device)
    if train is None:
        from fvdiffusion.zoo.mnist_data import load_mnist

        train, reference = load_mnist("train").images, load_mnist("reference").images
    images = train.to(dev, torch.float32)

    torch.manual_seed(config.seed)
    model = FeatureNet(config.model).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    meta = {"kind": RUN_KIND, "config": config.to_dict(), "num_train_images": int(images.shape[0])}

    step, elapsed_before, last_loss = 0, 0.0, None
    if not resume and has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if resume and has_checkpoint(run_dir):
        ckpt = load_checkpoint(run_dir)
        if ckpt.meta.get("kind") != RUN_KIND or ckpt.meta.get("config") != meta["config"]:
            raise ValueError(f"resume: {run_dir} holds a {ckpt.meta.get('kind')!r} run with another config")
        model.load_state_dict(ckpt.model)
        restore_optimizer(optimizer, ckpt.optimizer_state)
        generator.set_state(ckpt.rng_state)
        step, elapsed_before, last_loss = ckpt.step, float(ckpt.meta.get("elapsed_s", 0.0)), ckpt.meta.get("loss")
    if command:
        meta["command"] = command

    start = time.monotonic()
    window = LossWindow(dev)
    bar = tqdm(total=config.steps, initial=step, desc="feature net", disable=not progress, dynamic_ncols=True)

    def checkpoint(extra: dict | None = None) -> Path:
        info = {**meta, "elapsed_s": round(elapsed_before + time.monotonic() - start, 1), "loss": last_loss,
                "device": device_label(dev), **(extra or {})}
        return save_checkpoint(run_dir, step, info, model, optimizer, generator)

    model.train()
    try:
        while step < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(config, step)
            x = images[torch.randint(images.shape[0], (config.batch_size,), generator=generator, device=dev)]
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            window.add(loss)
            if step % config.log_every == 0 or step == config.steps:
                last_loss = window.report(run_dir, bar, step, elapsed_before + time.monotonic() - start)
            if step % config.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        bar.close()

    model.set_feature_scale(images)
    ref_mse = reconstruction_mse(model, reference) if reference is not None else None
    path = checkpoint({"reference_mse": ref_mse})
    return FeatureNetSummary(run_dir, step, elapsed_before + time.monotonic() - start, last_loss, ref_mse, path)
