"""Classifier log-probability reward: r(x) = log p(c | clamp(x, −1, 1))."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ClassifierReward:
    """Reward of class ``target_class`` under a classifier returning logits [B, num_classes].

    The input (typically the Tweedie estimate x̂0) is clamped to the data range [−1, 1]
    first, because early x̂0 estimates overshoot it and the classifier never saw such values.
    A NaN in one particle stays in that particle's reward (the engine then kills it).
    """

    def __init__(self, classifier: nn.Module, target_class: int, num_classes: int = 10) -> None:
        if isinstance(target_class, bool) or not isinstance(target_class, int) or not 0 <= target_class < num_classes:
            raise ValueError(f"target_class must be an int in 0..{num_classes - 1}, got {target_class!r}")
        self.classifier = classifier
        self.target_class = target_class
        self.num_classes = num_classes
        self.name = f"log p(class={target_class} | x)"

    @torch.no_grad()
    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        device = next(self.classifier.parameters()).device
        logits = self.classifier(x0.clamp(-1, 1).to(device, torch.float32))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"classifier returned shape {tuple(logits.shape)}, expected [B, {self.num_classes}]")
        return logits.log_softmax(dim=1)[:, self.target_class].to(x0.device)
