"""CIFAR ResNets of He et al. (2016), depth 6n+2, and Wide ResNets (Zagoruyko & Komodakis, 2016)."""

import torch.nn as nn
import torch.nn.functional as F


def _w(c: float) -> int:
    return max(1, int(round(c)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()  # modules, so activations can be swapped generically

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 input: three stages of 16/32/64 channels times ``width``."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [_w(16 * width), _w(32 * width), _w(64 * width)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for k in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and k == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20/32/56/... for CIFAR; ``width=2`` gives MEST's 2x-wide ResNet-32."""
    return CifarResNet(depth, num_classes, width)


class WideBlock(nn.Module):
    """Pre-activation block of a Wide ResNet."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        o = self.act1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.act2(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k: pre-activation blocks, widths 16k/32k/64k."""

    def __init__(self, depth: int, k: float, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, _w(16 * k), _w(32 * k), _w(64 * k)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def wide_resnet(depth: int, k: float, num_classes: int = 10) -> WideResNet:
    """A Wide ResNet, e.g. ``wide_resnet(16, 8)`` for WRN-16-8."""
    return WideResNet(depth, k, num_classes)
