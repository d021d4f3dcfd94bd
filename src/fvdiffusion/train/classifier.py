"""The classifier recipe: the reward classifier, the evaluation network and the MLP judge.

Light geometric augmentation (small rotation, scale and shift; never flips) makes the
reward classifier and the eval net robust to the slightly off-centre digits a diffusion
model produces. The MLP classifier (kind ``mlp``) is trained with **no augmentation**, and
the recipe refuses to add any: its penultimate activations are the ``mlp`` FID/KID space,
which must keep slant, position and size (what augmentation teaches a network to ignore).
AdamW with warm-up and cosine decay over ``steps``. Each kind has its own default seed, so
the judges and the reward differ in initialisation and batch order as well as
architecture. The reference split is only scored at the end, never used for choices
during training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvdiffusion.train.resumable import SEED_MAX, ResumableRun, check_float, check_int
from fvdiffusion.zoo.classifiers import EvalNet, MlpClassifier, RewardClassifier

KINDS = ("reward", "eval", "mlp")
_DEFAULT_SEED = {"reward": 1, "eval": 2, "mlp": 4}  # 0: the DDPM, 3: the feature autoencoder
ZOO_KIND = {"reward": "reward_classifier", "eval": "eval_net", "mlp": "mlp_classifier"}
UNAUGMENTED_KINDS = ("mlp",)  # feature-space judges: augmentation would blind them to within-class variety


@dataclass(frozen=True)
class ClassifierTrainConfig:
    kind: str
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    seed: int = 1
    augment: bool = True
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    max_scale: float = 0.1
    checkpoint_every: int = 300
    log_every: int = 25

    def __post_init__(self) -> None:
        owner = "ClassifierTrainConfig"
        if self.kind not in KINDS:
            raise ValueError(f"{owner}.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "warmup_steps", self.warmup_steps, low=0, high=self.steps - 1)
        check_int(owner, "seed", self.seed, low=0, high=SEED_MAX)
        check_float(owner, "lr", self.lr, 0.0, strict=True)
        for name in ("weight_decay", "max_rotation_deg", "max_shift_px"):
            check_float(owner, name, getattr(self, name), 0.0)
        check_float(owner, "max_scale", self.max_scale, 0.0, below=1.0)  # the scale 1 ± max_scale stays > 0
        if not isinstance(self.augment, bool):
            raise ValueError(f"{owner}.augment must be a bool, got {self.augment!r}")
        if self.augment and self.kind in UNAUGMENTED_KINDS:
            raise ValueError(f"{owner}.augment must be False for kind {self.kind!r}: its features are an FID/KID "
                             f"space that must see slant, position and size")

    @classmethod
    def for_kind(cls, kind: str, **overrides) -> "ClassifierTrainConfig":
        """The recipe defaults for ``kind`` (its own seed; no augmentation for the ``mlp`` judge)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        defaults = {"kind": kind, "seed": _DEFAULT_SEED[kind], "augment": kind not in UNAUGMENTED_KINDS}
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierSummary:
    run_dir: Path
    step: int
    elapsed_s: float
    loss: float | None
    reference_accuracy: float | None  # None when no reference images were given
    checkpoint: Path


def build_classifier(kind: str) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"reward": RewardClassifier, "eval": EvalNet, "mlp": MlpClassifier}[kind]()


def augment(x: Tensor, config: ClassifierTrainConfig, generator: torch.Generator) -> Tensor:
    """Random small rotation / scale / shift per image; the background stays at −1."""
    b = x.shape[0]
    u = torch.rand((b, 4), generator=generator, device=x.device) * 2 - 1
    angle = u[:, 0] * math.radians(config.max_rotation_deg)
    scale = 1 + u[:, 1] * config.max_scale
    shift = u[:, 2:] * (2 * config.max_shift_px / x.shape[-1])  # affine_grid uses [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size].to(dev))
        correct += (logits.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / images.shape[0]


def train_classifier(
    config: ClassifierTrainConfig,
    run_dir: Path,
    train: tuple[Tensor, Tensor] | None = None,
    reference: tuple[Tensor, Tensor] | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ClassifierSummary:
    """Train (or continue) a classifier; ``train``/``reference`` default to the MNIST splits.

    Pass ``reference=None`` together with an explicit ``train`` to skip the final scoring.
    """
    run_dir = Path(run_dir)
    dev = torch.device(device)
    if train is None:
        from fvdiffusion.zoo.mnist_data import load_mnist

        split = load_mnist("train")
        train = (split.images, split.labels)
        ref = load_mnist("reference")
        reference = (ref.images, ref.labels)
    images, labels = train[0].to(dev, torch.float32), train[1].to(dev)

    torch.manual_seed(config.seed)
    model = build_classifier(config.kind).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    meta = {"kind": f"classifier/{config.kind}", "config": config.to_dict(),
            "model": model.config.to_dict(), "num_train_images": int(images.shape[0])}

    run = ResumableRun(run_dir, dev, meta, model, optimizer, generator, progress=progress)
    run.start(resume, check=lambda saved: _check_resumable(saved, config, run_dir), command=command)

    def train_step(step: int) -> Tensor:
        idx = torch.randint(images.shape[0], (config.batch_size,), generator=generator, device=dev)
        x = images[idx]
        if config.augment:
            x = augment(x, config, generator)
        # dropout draws from the global RNG: seed it per step so a resumed run matches
        torch.manual_seed(config.seed * 1_000_003 + step)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    run.run(config.steps, train_step, lambda step: warmup_cosine_lr(config, step), log_every=config.log_every,
            checkpoint_every=config.checkpoint_every, desc=f"{config.kind} classifier")
    ref_acc = accuracy(model, reference[0], reference[1]) if reference is not None else None
    path = run.checkpoint({"reference_accuracy": ref_acc})
    return ClassifierSummary(run_dir, run.step, run.elapsed_s, run.last_loss, ref_acc, path)


def _check_resumable(saved: dict, config: ClassifierTrainConfig, run_dir: Path) -> None:
    if saved.get("config", {}).get("seed") != config.seed:
        raise ValueError(f"resume: {run_dir} holds a {saved.get('kind')!r} run with another seed "
                         f"({saved.get('config', {}).get('seed')!r}, not {config.seed})")


def warmup_cosine_lr(config, step: int) -> float:
    """Linear warm-up to ``config.lr`` over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
