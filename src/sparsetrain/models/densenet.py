"""DenseNet-121 for CIFAR (Huang et al., 2017): growth 32, 3x3 stem, no initial pooling."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.act2(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv and 2x2 average pooling between dense blocks."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return F.avg_pool2d(self.conv(self.act(self.bn(x))), 2)


class DenseNet(nn.Module):
    """DenseNet-BC with a 3x3 stem for 32x32 input."""

    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, reduction: float = 0.5, num_classes: int = 10):
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        stages = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            stages.append(nn.Sequential(*layers))
            if i < len(blocks) - 1:
                out = int(c * reduction)
                stages.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(self.features(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def densenet121(num_classes: int = 10, width: float = 1.0) -> DenseNet:
    """DenseNet-121 for CIFAR; ``width`` scales the growth rate."""
    return DenseNet(growth=max(1, int(round(32 * width))), num_classes=num_classes)
