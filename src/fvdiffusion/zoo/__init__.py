"""The project's MNIST model zoo: data, networks and the shipped weights with their loaders."""

from fvdiffusion.errors import DataCorruptError, DataMissingError, WeightsError, WeightsMissingError
from fvdiffusion.zoo.classifiers import (
    EvalNet,
    EvalNetConfig,
    MlpClassifier,
    MlpClassifierConfig,
    RewardClassifier,
    RewardClassifierConfig,
)
from fvdiffusion.zoo.feature_net import FeatureNet, FeatureNetConfig
from fvdiffusion.zoo.loaders import (
    load_ddpm,
    load_eval_net,
    load_feature_net,
    load_mlp_classifier,
    load_reward_classifier,
)
from fvdiffusion.zoo.mnist_data import MnistSplit, load_mnist
from fvdiffusion.zoo.unet import UNet, UNetConfig

__all__ = [
    "DataCorruptError",
    "DataMissingError",
    "EvalNet",
    "EvalNetConfig",
    "FeatureNet",
    "FeatureNetConfig",
    "MlpClassifier",
    "MlpClassifierConfig",
    "MnistSplit",
    "RewardClassifier",
    "RewardClassifierConfig",
    "UNet",
    "UNetConfig",
    "WeightsError",
    "WeightsMissingError",
    "load_ddpm",
    "load_eval_net",
    "load_feature_net",
    "load_mlp_classifier",
    "load_mnist",
    "load_reward_classifier",
]
