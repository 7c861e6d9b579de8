"""Wide residual networks WRN-d-w for 32x32 inputs (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

Pre-activation blocks B(3,3) (BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3), a conv3x3 stem of 16 channels,
three groups of n = (d - 4) / 6 blocks with 16w, 32w and 64w channels (strides 1, 2, 2), then BN-ReLU,
global average pooling and ``fc``. Where a block changes width or stride, its shortcut is a 1x1 convolution
of the pre-activated input (the paper's Table 1 and its reference code's convention). WRN-40-2 has 2.2M
parameters, WRN-16-1 0.18M.

Module names for feature hooks: ``layer1``, ``layer2``, ``layer3`` (group outputs; pre-activation, i.e.
before the final BN-ReLU), ``relu`` (the final activated 64w x 8 x 8 map), ``avgpool``; classifier ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.registry import MODELS


class WideBasicBlock(nn.Module):
    """Pre-activation block: x + conv(relu(bn(dropout(conv(relu(bn(x))))))), 1x1 conv shortcut on change."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # A changed shape is projected from the activated input, so the BN-ReLU is shared by both paths.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs; see the module docstring."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40); got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1; got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.layer1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._group(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, planes, stride, dropout)]
        blocks += [WideBasicBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@MODELS.register("wide_resnet")
def wide_resnet(
    depth: int = 16, widen_factor: int = 1, num_classes: int = 10, dropout: float = 0.0, **kw: Any
) -> WideResNet:
    """Any WRN-depth-widen_factor (e.g. ``wide_resnet(depth=28, widen_factor=10, dropout=0.3)``)."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, dropout=dropout, **kw)


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-16-1 (0.18M parameters)."""
    return wide_resnet(16, 1, num_classes=num_classes, **kw)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-16-2 (0.69M parameters)."""
    return wide_resnet(16, 2, num_classes=num_classes, **kw)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-40-1 (0.56M parameters)."""
    return wide_resnet(40, 1, num_classes=num_classes, **kw)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-40-2 (2.2M parameters; 2,243,546 with 10 classes)."""
    return wide_resnet(40, 2, num_classes=num_classes, **kw)
