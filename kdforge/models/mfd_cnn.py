"""The 6-conv CNN used for CIFAR-10S in "Fair Feature Distillation for Visual Recognition" (MFD, CVPR 2022).

Supplement section 1.1: six 3x3 convolutions with 32, 32, 64, 64, 128, 128 channels, ReLU activations,
max-pooling and dropout after every two convolutions, followed by fully connected layers with ReLU. The
supplement gives neither padding, dropout rate nor hidden width; these come from the authors' code
(networks/cifar_net.py): padding 1, 2x2 max-pooling, dropout 0.25, no BatchNorm, and one hidden layer
``fc1`` of 256 units (32 -> 16 -> 8 -> 4, so fc1 maps 128*4*4 = 2048 -> 256), then the classifier ``fc``.
The supplement's "two fully connected hidden layers" reads, in that code, as fc1 and the classifier;
``hidden=(256, 256)`` builds the literal reading (two hidden layers ``fc1``, ``fc2`` before ``fc``).

Feature for MFD's MMD loss (the penultimate layer): hook ``relu_fc1`` (the 256-d fc1 output after ReLU;
with two hidden layers the penultimate one is ``relu_fc2``). Feature after the last convolution (used by
AT in the paper): hook ``relu6`` (128x8x8) or ``pool3`` (128x4x4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdforge.registry import MODELS


class MFDCNN(nn.Module):
    """Six 3x3 convs (32-32-64-64-128-128), pool+dropout every two, hidden FC(s) with ReLU, then ``fc``."""

    def __init__(
        self,
        num_classes: int = 10,
        dropout: float = 0.25,
        hidden: Sequence[int] = (256,),
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if len(hidden) < 1:
            raise ValueError("MFD CNN needs at least one hidden fully connected layer (hidden=(256,))")
        channels = [in_channels, 32, 32, 64, 64, 128, 128]
        for i in range(1, 7):
            self.add_module(f"conv{i}", nn.Conv2d(channels[i - 1], channels[i], 3, padding=1))
            self.add_module(f"relu{i}", nn.ReLU())
            if i % 2 == 0:
                self.add_module(f"pool{i // 2}", nn.MaxPool2d(2))
                self.add_module(f"drop{i // 2}", nn.Dropout(dropout))
        size = input_size // 8  # three 2x2 poolings
        if size < 1:
            raise ValueError(f"MFD CNN input_size must be >= 8 (three 2x2 poolings); got {input_size}")
        width = 128 * size * size
        self.num_hidden = len(hidden)
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, h))
            self.add_module(f"relu_fc{i}", nn.ReLU())
            width = h
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._modules
        for i in range(1, 7):
            x = m[f"relu{i}"](m[f"conv{i}"](x))
            if i % 2 == 0:
                x = m[f"drop{i // 2}"](m[f"pool{i // 2}"](x))
        x = torch.flatten(x, 1)
        for i in range(1, self.num_hidden + 1):
            x = m[f"relu_fc{i}"](m[f"fc{i}"](x))
        return self.fc(x)


@MODELS.register("mfd_cnn")
def mfd_cnn(num_classes: int = 10, **kw: Any) -> MFDCNN:
    """The MFD paper's CIFAR-10S CNN; hook ``relu_fc1`` for its 256-d MMD feature."""
    return MFDCNN(num_classes=num_classes, **kw)
