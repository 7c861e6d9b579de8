"""A frozen feature network over generated images: perceptual and style losses, FID features, downstream scores.

ImageNet backbones (VGG for OMGD's style loss, Inception for FID) cannot be downloaded here, so the network is
named by the user: any model kdforge can build (a registered name, `torchvision:x`, `timm:x`, `pkg.mod:factory`)
with a local weights file, tapped at named modules. Tables name it (`describe`), so a loss or FID computed on a
CIFAR ResNet is never mistaken for one on VGG or Inception.

Images arrive in the generator's space (`image_mean`/`image_std`: [-1, 1] by default, x = (x01 - 0.5) / 0.5),
are mapped back to [0, 1], optionally resized, and normalised with the network's own `mean`/`std`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's and the shared CIFAR-10 ResNets' weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_KEYS = ("name", "weights", "layers", "kwargs", "mean", "std", "size")


class FrozenFeatures(nn.Module):
    """`model`'s outputs at `layers` (module names; "auto:in" = the pooled input of the last nn.Linear) for images
    in the generator's space; weights frozen, always in eval mode, gradients still reach the images."""

    def __init__(self, model: nn.Module, layers: Sequence[str], *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), size: int | None = None,
                 description: str | None = None) -> None:
        super().__init__()
        from kdforge.distillers.base import FeatureTaps  # the distillers package imports this module

        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("a feature network needs at least one layer to tap (e.g. 'auto:in' or 'layer2')")
        self.model = model.eval().requires_grad_(False)
        self.taps = FeatureTaps(model, layers, role="feature network")
        self.layers, self.size = list(layers), size
        # x_net = ((x * image_std + image_mean) - mean) / std, as one affine map per channel
        scale = torch.tensor(image_std) / torch.tensor(std)
        shift = (torch.tensor(image_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)
        self.description = description or f"{type(model).__name__}:{','.join(self.layers)}"

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)  # BN statistics of a fixed network never move

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() * self.scale + self.shift
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        self.model(x)
        return self.taps.take()


def build_feature_net(spec: dict[str, Any] | nn.Module, *, default_layers: Sequence[str] = ("auto:in",),
                      image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                      role: str = "feature_net") -> FrozenFeatures:
    """A FrozenFeatures from a recipe's spec {name, weights, layers, kwargs, mean, std, size}, or a given module
    (tapped at `default_layers`). A spec without weights is refused: random features would give numbers that look
    like a perceptual loss or an FID and mean nothing."""
    if isinstance(spec, FrozenFeatures):
        return spec
    if isinstance(spec, nn.Module):
        return FrozenFeatures(spec, default_layers, image_mean=image_mean, image_std=image_std)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{role}: expected {{name, weights, layers, ...}} naming a model and its local weights file, "
                         f"got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        from kdforge.registry import did_you_mean

        raise ValueError(f"{role}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], SPEC_KEYS)} "
                         f"(keys: {', '.join(SPEC_KEYS)})")
    from kdforge.config import expand_path
    from kdforge.models import build_model, load_weights

    weights = spec.get("weights")
    if not weights:
        raise ValueError(f"{role}: {spec['name']!r} has no weights file; a feature network with random weights "
                         "measures nothing (give weights: <path>, e.g. a classifier kdforge trained)")
    path = Path(expand_path(str(weights)))
    if not path.is_file():
        raise FileNotFoundError(f"{role}: weights file {path} not found")
    model = build_model(spec["name"], **dict(spec.get("kwargs") or {}))
    load_weights(model, path)
    layers = spec.get("layers") or list(default_layers)
    layers = [layers] if isinstance(layers, str) else list(layers)
    return FrozenFeatures(model, layers, mean=spec.get("mean") or IMAGENET_MEAN, std=spec.get("std") or IMAGENET_STD,
                          image_mean=image_mean, image_std=image_std, size=spec.get("size"),
                          description=f"{spec['name']} ({path.name}) at {','.join(layers)}")
