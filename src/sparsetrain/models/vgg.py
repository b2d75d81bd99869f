"""VGG with batch normalisation for 32x32 input (one linear classifier, as is usual on CIFAR)."""

import torch.nn as nn

_CONFIGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-16/19 with BN for 32x32 input and a single linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(_CONFIGS)}, got {depth}")
        layers, cin = [], 3
        for v in _CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, int(round(v * width)))
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg(depth: int, num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-``depth`` (16 or 19) with BN; ``width`` scales every stage."""
    return VGG(depth, num_classes, width)
