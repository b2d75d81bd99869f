"""MobileNetV2 (Sandler et al., 2018) for CIFAR: stride 1 in the stem and the first stride-2 stage."""

import torch.nn as nn
import torch.nn.functional as F

# (expansion, out channels, repeats, stride); strides of the CIFAR variant.
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1); residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        mid = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU6()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with CIFAR strides."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = max(1, int(round(32 * width)))
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        layers = []
        for t, out, n, s in _CFG:
            out = max(1, int(round(out * width)))
            for i in range(n):
                layers.append(InvertedResidual(c, out, t, s if i == 0 else 1))
                c = out
        self.layers = nn.Sequential(*layers)
        last = max(1280, int(round(1280 * width)))
        self.conv2 = nn.Conv2d(c, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.fc = nn.Linear(last, num_classes)
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU6()

    def forward(self, x):
        x = self.layers(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for CIFAR; ``width`` is the usual width multiplier."""
    return MobileNetV2(num_classes, width)
