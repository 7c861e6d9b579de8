"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2).

Three stages of n = (depth - 2) / 6 BasicBlocks with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps,
a conv3x3-BN-ReLU stem, global average pooling and a linear classifier: 6n + 2 weighted layers.
Shortcuts are the paper's **option A**: identity where shapes agree; where a stage halves the map and
doubles the channels, the input is subsampled with stride 2 and zero-padded with the new channels, so the
shortcuts add no parameters (ResNet-20 has 0.27M, ResNet-56 0.85M, as in the paper's Table 6).

Attribute names follow the widely used pretrained CIFAR-10 checkpoints (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``linear``), so those files load with ``strict=True`` once their ``module.``
prefix is stripped (see :func:`kdforge.models.weights.load_weights`). Features for distillation are taken
by forward hooks on module names: ``layer3`` (the last stage's output, 64x8x8), ``layer3.<i>`` (one block),
``avgpool`` (the pooled 64x1x1 vector).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.registry import MODELS


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel, then zero-pad the channel dimension on both sides.

    With ``pad`` = planes // 4 on each side, C channels become C + 2 * pad (16 -> 32, 32 -> 64).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad's tuple runs from the last dim backwards: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (He et al. 2016, Fig. 2)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with option-A shortcuts; see the module docstring."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110); got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            # He et al. 2015 initialisation ("Delving deep into rectifiers"), as the paper uses.
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _make(depth: int) -> Callable[..., CifarResNet]:
    """Build and register the factory `resnet<depth>(num_classes=10, **kw)`."""

    def factory(num_classes: int = 10, **kw: Any) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, **kw)

    factory.__name__ = f"resnet{depth}"
    factory.__qualname__ = factory.__name__
    factory.__doc__ = f"ResNet-{depth} for CIFAR ({(depth - 2) // 6} blocks per stage, option-A shortcuts)."
    return MODELS.register(factory.__name__)(factory)


resnet20 = _make(20)
resnet32 = _make(32)
resnet44 = _make(44)
resnet56 = _make(56)
resnet110 = _make(110)
