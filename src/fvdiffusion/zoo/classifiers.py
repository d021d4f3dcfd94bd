"""The MNIST classifiers: the reward classifier, the evaluation network and the MLP judge.

They differ on purpose (architecture, normalisation, activation and training seed) so a
sampler that exploits quirks of the reward network is not also rewarded by the judge.
The MLP classifier is a third, independent judge used only for its features (the ``mlp``
FID/KID space): no convolution, no pooling and no augmentation in its training.
All take images in [-1, 1], shape [B, 1, 28, 28], and return logits [B, 10].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10


def _check_positive(owner: str, **fields: int) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class RewardClassifierConfig:
    channels1: int = 32
    channels2: int = 64
    hidden: int = 64
    dropout: float = 0.25

    def __post_init__(self) -> None:
        _check_positive("RewardClassifierConfig", channels1=self.channels1, channels2=self.channels2, hidden=self.hidden)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RewardClassifierConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RewardClassifierConfig":
        return cls(**data)


class RewardClassifier(nn.Module):
    """A plain VGG-style CNN: two conv pairs with max-pooling, then a small MLP head."""

    def __init__(self, config: RewardClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or RewardClassifierConfig()
        self.body = nn.Sequential(
            nn.Conv2d(1, c.channels1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c.channels1, c.channels1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c.channels1, c.channels2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c.channels2, c.channels2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(c.dropout),
            nn.Linear(c.channels2 * 7 * 7, c.hidden), nn.ReLU(),
            nn.Dropout(c.dropout), nn.Linear(c.hidden, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class EvalNetConfig:
    widths: tuple[int, ...] = (32, 64, 96)
    blocks_per_stage: int = 2
    num_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != 3:
            raise ValueError(f"EvalNetConfig.widths must have 3 entries (14, 7, 4 px stages), got {self.widths!r}")
        _check_positive("EvalNetConfig", blocks_per_stage=self.blocks_per_stage, num_groups=self.num_groups)
        for w in self.widths:
            if w < 1 or w % self.num_groups:
                raise ValueError(f"EvalNetConfig.widths must be positive multiples of num_groups={self.num_groups}, got {w}")

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalNetConfig":
        return cls(**{**data, "widths": tuple(data["widths"])})


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.gelu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.gelu(self.norm2(h)))


class EvalNet(nn.Module):
    """A pre-activation ResNet (GroupNorm, GELU, global average pooling) used only for judging.

    The stem works at 28×28 and each of the three stages starts with a stride-2 block, so
    the costly convolutions run at 14×14 and below (fast enough to judge thousands of samples).
    """

    def __init__(self, config: EvalNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or EvalNetConfig()
        self.stem = nn.Conv2d(1, c.widths[0], 3, padding=1)
        blocks, c_in = [], c.widths[0]
        for stage, width in enumerate(c.widths):
            for i in range(c.blocks_per_stage):
                stride = 2 if i == 0 else 1  # every stage halves: 28 -> 14 -> 7 -> 4
                blocks.append(_PreActBlock(c_in, width, stride, c.num_groups))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(c.num_groups, c_in)
        self.fc = nn.Linear(c_in, NUM_CLASSES)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] (for FID and diversity)."""
        h = F.gelu(self.norm(self.blocks(self.stem(x))))
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@dataclass(frozen=True)
class MlpClassifierConfig:
    hidden1: int = 256
    hidden2: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_positive("MlpClassifierConfig", hidden1=self.hidden1, hidden2=self.hidden2)
        number = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not number or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MlpClassifierConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MlpClassifierConfig":
        return cls(**data)


class MlpClassifier(nn.Module):
    """A plain MLP on the 784 flattened pixels: two (Linear, LayerNorm, GELU) layers, then Linear.

    Every pixel has its own weights (no convolution, no pooling), so its features keep where
    the ink is. The features are the second hidden layer's activations (``hidden2``-d,
    after GELU; dropout acts only in training).
    """

    def __init__(self, config: MlpClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MlpClassifierConfig()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, c.hidden1), nn.LayerNorm(c.hidden1), nn.GELU(), nn.Dropout(c.dropout),
            nn.Linear(c.hidden1, c.hidden2), nn.LayerNorm(c.hidden2), nn.GELU(),
        )
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden2, NUM_CLASSES)

    @property
    def feature_dim(self) -> int:
        return self.config.hidden2

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [B, feature_dim] (the ``mlp`` FID/KID space)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.features(x)))
