"""Small models for 28x28 single-channel input (MNIST, Fashion-MNIST) and for fast tests."""

import torch.nn as nn


def _w(c: float) -> int:
    return max(1, int(round(c)))


def small_cnn(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> nn.Sequential:
    """Two conv layers and two linear layers (LeNet-like)."""
    c1, c2, h = _w(32 * width), _w(64 * width), _w(128 * width)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, h),
        nn.ReLU(),
        nn.Linear(h, num_classes),
    )


def small_mlp(num_classes: int = 10, width: float = 1.0, in_features: int = 28 * 28) -> nn.Sequential:
    """A 300-100 multilayer perceptron (LeNet-300-100)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, _w(300 * width)),
        nn.ReLU(),
        nn.Linear(_w(300 * width), _w(100 * width)),
        nn.ReLU(),
        nn.Linear(_w(100 * width), num_classes),
    )
