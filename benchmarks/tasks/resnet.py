"""The fmnist-resnet model: a small ResNet (BasicBlocks with BatchNorm and identity/1x1
shortcuts) for 28x28 grey images."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FMNISTResNet(nn.Module):
    """Stem 32 ch at 28x28, then stages of (32, 64, 128) channels at 14, 7, 4 with (1, 2, 1)
    blocks, global average pooling and a linear head: 0.39 M parameters. Every stage starts with a
    stride-2 block: a first stage kept at 28x28 took 2.9 s per batch of 128 on this shared 2-core
    machine (21 min an epoch), downsampling first about a quarter of that."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (32, 64, 128),
        blocks: tuple[int, int, int] = (1, 2, 1),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers, cin = [], widths[0]
        for w, n in zip(widths, blocks):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))
