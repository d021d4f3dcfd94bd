"""The feature spaces FID and KID are measured in, by name.

* ``evalnet`` — the evaluation network's globally pooled penultimate features (96-d). It
  was trained with rotation/shift/scale augmentation, so it scores class identity and
  stroke quality but is nearly blind to within-class variety: a few digits repeated can
  score like a diverse set.
* ``ae`` — the latent (32-d) of the feature autoencoder, trained without augmentation
  and without pooling; it sees slant, position, size and stroke, so it punishes a
  collapsed set.
* ``mlp`` — the penultimate activations (128-d) of an MLP classifier on the flattened
  pixels (no convolution, no pooling), trained without augmentation on the train split:
  an independently trained judge of a third architecture (different from the reward
  classifier's VGG-style CNN, the eval net's residual CNN and the autoencoder). It keeps
  where the ink is, so it punishes a collapsed set, and, being a classifier, it also
  separates classes sharply.

See docs/feature_space.md for the measured comparison.

Images are [N, 1, 28, 28] in the data range [-1, 1] (the range of the MNIST splits and of
the DDPM's samples); they are clamped to it first, because samples overshoot slightly and
no network saw values outside it. The networks are loaded once per (space, device).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

FEATURE_SPACES = ("evalnet", "ae", "mlp")


def image_features(images: Tensor, space: str, device: str | torch.device = "cpu", batch_size: int = 256) -> Tensor:
    """Features float64 [N, D] on the CPU of ``images`` in the feature space ``space``."""
    if space not in FEATURE_SPACES:
        raise ValueError(f"space: expected one of {FEATURE_SPACES}, got {space!r}")
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must be a tensor [N, 1, 28, 28], got {getattr(images, 'shape', type(images))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return _batched_features(_network(space, str(torch.device(device))), images, batch_size)


@functools.lru_cache(maxsize=8)
def _network(space: str, device: str) -> nn.Module:
    from fvdiffusion.zoo.loaders import load_eval_net, load_feature_net, load_mlp_classifier

    loader = {"evalnet": load_eval_net, "ae": load_feature_net, "mlp": load_mlp_classifier}[space]
    return loader(device=device)


@torch.no_grad()
def _batched_features(net: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    device = next(net.parameters()).device
    chunks = [
        net.features(images[i: i + batch_size].to(device, torch.float32).clamp(-1, 1)).to("cpu", torch.float64)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, net.feature_dim, dtype=torch.float64)
