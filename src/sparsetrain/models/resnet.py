"""ResNet-18 adapted to CIFAR (3x3 stem, no max-pool) and ImageNet ResNet-50 (for accounting)."""

import torch.nn as nn
import torch.nn.functional as F

from .cifar_resnet import BasicBlock, _w


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 residual block with 4x expansion."""

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The ResNet-18/50 family, with an ImageNet stem (7x7, max-pool) or a CIFAR stem (3x3)."""

    def __init__(self, block, counts, num_classes: int, width: float, imagenet_stem: bool):
        super().__init__()
        widths = [_w(64 * width * m) for m in (1, 2, 4, 8)]
        stem = widths[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem)
        cin, stages = stem, []
        for i, (w, n) in enumerate(zip(widths, counts)):
            blocks = []
            for k in range(n):
                stride = 2 if (i > 0 and k == 0) else 1
                if block is Bottleneck:
                    blocks.append(Bottleneck(cin, w, stride))
                    cin = w * Bottleneck.expansion
                else:
                    blocks.append(BasicBlock(cin, w, stride))
                    cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-18 for CIFAR: 3x3 stem, no max-pool (0.56 GMACs per image)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, imagenet_stem=False)


def resnet50(num_classes: int = 1000, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-50 (4.1 GMACs per 224x224 image), for accounting."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width, imagenet_stem=True)
