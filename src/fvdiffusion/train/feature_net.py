"""The feature-network recipe: an autoencoder on clean train digits, no augmentation at all.

No augmentation on purpose: the latent must keep slant, position, size and stroke (what the
evaluation network was trained to ignore), so a set of a few digits repeated lands far from
the real class in this space. Pixel MSE on [-1, 1], AdamW with warm-up and cosine decay.
The reference split is only scored at the end (reconstruction MSE), never used for choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fvdiffusion.train.classifier import warmup_cosine_lr
from fvdiffusion.train.resumable import SEED_MAX, ResumableRun, check_float, check_int
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
        owner = "FeatureNetTrainConfig"
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "warmup_steps", self.warmup_steps, low=0, high=self.steps - 1)
        check_int(owner, "seed", self.seed, low=0, high=SEED_MAX)
        check_float(owner, "lr", self.lr, 0.0, strict=True)
        check_float(owner, "weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.model, FeatureNetConfig):
            raise ValueError(f"{owner}.model must be a FeatureNetConfig, got {type(self.model).__name__}")

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

    def check(saved: dict) -> None:
        if saved.get("config") != meta["config"]:
            raise ValueError(f"resume: {run_dir} holds a {saved.get('kind')!r} run with another config")

    run = ResumableRun(run_dir, dev, meta, model, optimizer, generator, progress=progress)
    run.start(resume, check=check, command=command)

    def train_step(step: int) -> Tensor:
        x = images[torch.randint(images.shape[0], (config.batch_size,), generator=generator, device=dev)]
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    run.run(config.steps, train_step, lambda step: warmup_cosine_lr(config, step), log_every=config.log_every,
            checkpoint_every=config.checkpoint_every, desc="feature net")
    model.set_feature_scale(images)
    ref_mse = reconstruction_mse(model, reference) if reference is not None else None
    path = run.checkpoint({"reference_mse": ref_mse})
    return FeatureNetSummary(run_dir, run.step, run.elapsed_s, run.last_loss, ref_mse, path)
