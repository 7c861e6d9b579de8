"""Image-space distillation terms shared by the generator students: wavelet bands (WKD) and LPIPS from local weights.

`haar_dwt` is the orthonormal 2-D Haar transform, level by level on the low band: each level maps an (N, C, H, W)
image to its low band (N, C, H/2, W/2) and three high bands, horizontal, vertical and diagonal detail. WKD (Zhang
et al., CVPR 2022, "Wavelet Knowledge Distillation") distils only the high bands: `wavelet_loss` is the mean absolute
difference of the student's and the target's high bands over `levels` levels (the low band is left to the other
terms).

`lpips_network` builds LPIPS (Zhang et al. 2018) with torchmetrics' implementation and its shipped linear heads, the
backbone (AlexNet, VGG16 or SqueezeNet 1.1, ImageNet-trained) loaded from the user's local torchvision state-dict file:
torchmetrics would otherwise download it, which these machines cannot.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.registry import LOSSES

LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def haar_dwt(x: Tensor, levels: int = 1) -> tuple[Tensor, list[Tensor]]:
    """(low band after `levels` levels, [high bands of level 1, 2, ...] each (N, 3C, H/2^l, W/2^l))."""
    if levels < 1:
        raise ValueError(f"haar_dwt: levels must be >= 1, got {levels}")
    highs = []
    for level in range(levels):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"haar_dwt: level {level + 1} needs an even height and width, got {tuple(x.shape[-2:])}")
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of every 2 x 2 block
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
        x = (a + b + c + d) / 2
        highs.append(torch.cat([(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], dim=1))
    return x, highs


@LOSSES.register("wavelet_loss")
def wavelet_loss(s: Tensor, t: Tensor, levels: int = 1) -> Tensor:
    """WKD: mean |high bands of s - high bands of t| over `levels` Haar levels (averaged over levels)."""
    if s.shape != t.shape:
        raise ValueError(f"wavelet_loss: shapes differ, {tuple(s.shape)} vs {tuple(t.shape)}")
    _, hs = haar_dwt(s, levels)
    _, ht = haar_dwt(t, levels)
    return sum(F.l1_loss(a, b) for a, b in zip(hs, ht)) / levels


def lpips_network(net: str = "alex", backbone_weights: str | Path | None = None) -> nn.Module:
    """torchmetrics' LPIPS module with its linear heads, the backbone from a local torchvision state dict (e.g.
    alexnet-owt-7be5be79.pth). Frozen, in eval. Call it on images in [-1, 1]: `net(x, y)` -> (N, 1, 1, 1)."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"lpips: net must be one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
    if backbone_weights is None:
        raise ValueError(f"lpips: needs backbone_weights, a local torchvision {LPIPS_BACKBONES[net]} state dict "
                         "(ImageNet weights cannot be downloaded at run time)")
    path = Path(backbone_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"lpips: backbone weights file not found: {path}")
    import torchvision
    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError as e:  # a private class: say which torchmetrics is needed rather than fail obscurely
        raise ImportError("lpips: needs torchmetrics >= 1.0 (torchmetrics.functional.image.lpips._NoTrainLpips)") from e
    backbone = getattr(torchvision.models, LPIPS_BACKBONES[net])(weights=None)
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"lpips: {path} is not a torchvision {LPIPS_BACKBONES[net]} state dict: {e}") from e
    # random backbone (no download), the shipped linear heads; _NoTrainLpips stays in eval under .train() (dropout)
    model = _NoTrainLpips(pretrained=True, net=net, pnet_rand=True)
    features = backbone.features
    for slice_ in model.net.children():  # torchmetrics' slices hold features[i] under the name str(i)
        for name, module in slice_.named_children():
            module.load_state_dict(features[int(name)].state_dict())
    model.eval().requires_grad_(False)
    return model
