"""ResNet-18, ShuffleNetV2 (x1.0) and MobileNetV2 from torchvision, with an optional 32px (CIFAR) stem.

The networks are torchvision's own; kdforge only changes the stem when ``small_input=True``, the usual
adaptation for 32x32 images, which otherwise shrink to 1x1 before the last stage:

- ``resnet18``: ``conv1`` becomes a 3x3 stride-1 padding-1 convolution (64 channels, no bias) and
  ``maxpool`` becomes ``nn.Identity`` (the output stride goes from 32 to 8: a 4x4 map before pooling).
- ``shufflenet_v2``: the stride of ``conv1[0]`` (3x3) is set to 1 and ``maxpool`` becomes ``nn.Identity``.
- ``mobilenet_v2``: the stride of the first convolution ``features[0][0]`` (3x3) is set to 1.

For ShuffleNetV2 and MobileNetV2 only a stride changes, so every weight keeps its shape and ImageNet weights
(``weights=...``, the caller's choice; the default is none, nothing is downloaded) still load. Extra keyword
arguments go to the torchvision builder. Feature hooks use torchvision's names: ``layer4`` (ResNet-18),
``conv5`` (ShuffleNetV2), ``features`` (MobileNetV2), and ``avgpool`` where the model has one.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from kdforge.registry import MODELS


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, small_input: bool = False, **kw: Any) -> nn.Module:
    """torchvision ResNet-18; ``small_input`` uses a 3x3 stride-1 ``conv1`` and no max-pool (CIFAR stem)."""
    kw.setdefault("weights", None)
    model = torchvision.models.resnet18(num_classes=num_classes, **kw)
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # The same initialisation torchvision gives its other convolutions.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


@MODELS.register("shufflenet_v2")
def shufflenet_v2(num_classes: int = 10, small_input: bool = False, **kw: Any) -> nn.Module:
    """torchvision ShuffleNetV2 x1.0; ``small_input`` sets ``conv1`` stride 1 and removes the max-pool."""
    kw.setdefault("weights", None)
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes, **kw)
    if small_input:
        model.conv1[0].stride = (1, 1)
        model.maxpool = nn.Identity()
    return model


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, small_input: bool = False, **kw: Any) -> nn.Module:
    """torchvision MobileNetV2; ``small_input`` sets the stride of ``features[0][0]`` to 1."""
    kw.setdefault("weights", None)
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, **kw)
    if small_input:
        model.features[0][0].stride = (1, 1)
    return model
