"""Generators and discriminators for methods that synthesise their own inputs (MosaicKD, DAFL, DFAD).

Generators map z ~ N(0, I) to images in [0, 1]; the method normalises them with the data's mean/std before the
teacher sees them, so one generator serves any normalisation. Discriminators return logits (no sigmoid): a map
of patch logits (B, 1, h, w) or one logit per image (B, 1, 1, 1).

Layouts, for 32 x 32 images (MosaicKD appendix Tables 2-3 and the official code, which differ):
  generator "official": Linear z -> 4ngf x 8 x 8, BN; per doubling Upsample x2, 3x3 conv (no bias), BN,
      LeakyReLU 0.2 (4ngf -> 2ngf -> ngf); 3x3 conv -> 3, sigmoid. ngf 64.
  generator "paper": Linear z -> 128 x 8 x 8, BN, LeakyReLU; Upsample, 3x3 conv 128 -> 128, BN, LeakyReLU;
      Upsample, 3x3 conv 128 -> 64, BN, LeakyReLU; 3x3 conv -> 3, sigmoid.
  patch "official": 4x4 conv stride 2 -> ndf, LeakyReLU; 4x4 conv stride 2 -> 2ndf, BN, LeakyReLU;
      1x1 conv -> 1 with stride `final_stride` (8 x 8 logits at stride 1, patches of 10 px). ndf 128.
  patch "paper": 3x3 conv stride 2 -> 64, BN, LeakyReLU; 3x3 conv stride 2 -> 128, BN, LeakyReLU;
      3x3 conv -> 1 with stride `final_stride`.
Larger images get one more upsampling block per doubling (generator) and one more stride-2 block per doubling
(discriminator), so the patch map stays 8 x 8 and a patch covers the same fraction of the image.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdforge.registry import MODELS

LAYOUTS = ("official", "paper")


def _doublings(img_size: int, base: int, what: str) -> int:
    """How many times `base` doubles to `img_size` (>= 1), or a clear error."""
    n = math.log2(img_size / base) if img_size > base else 0
    if n < 1 or n != int(n):
        raise ValueError(f"{what}: img_size must be {base} times a power of two ({2 * base}, {4 * base}, ...), "
                         f"got {img_size}")
    return int(n)


def _layout(layout: str, what: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: unknown layout {layout!r}; use one of {', '.join(map(repr, LAYOUTS))}")


class Generator(nn.Module):
    """z (B, z_dim) -> images (B, 3, img_size, img_size) in [0, 1]."""

    def __init__(self, z_dim: int = 100, img_size: int = 32, ngf: int = 64, layout: str = "official",
                 out_channels: int = 3) -> None:
        super().__init__()
        _layout(layout, "generator")
        ups = _doublings(img_size, 8, "generator")  # from 8 x 8
        if layout == "official":
            widths, bias, act_after_linear = [4 * ngf] * (ups - 1) + [2 * ngf, ngf], False, False
        else:
            widths, bias, act_after_linear = [128] * ups + [64], True, True
        self.z_dim, self.img_size = z_dim, img_size
        self.project = nn.Linear(z_dim, widths[0] * 8 * 8)
        self.stem = nn.Sequential(nn.BatchNorm2d(widths[0]),
                                  *([nn.LeakyReLU(0.2, inplace=True)] if act_after_linear else []))
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z.flatten(1)).view(z.shape[0], -1, 8, 8)
        return torch.sigmoid(self.to_image(self.blocks(self.stem(h))))

    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` latent codes z ~ N(0, I) on `device` (the generator's own by default)."""
        device = device or self.project.weight.device
        return torch.randn(n, self.z_dim, device=device, generator=generator)


class PatchDiscriminator(nn.Module):
    """Images (B, 3, H, W) -> patch logits (B, 1, 8 / final_stride, ...) (ceil), one per receptive field."""

    def __init__(self, img_size: int = 32, ndf: int = 128, final_stride: int = 1, layout: str = "official",
                 in_channels: int = 3) -> None:
        super().__init__()
        _layout(layout, "patch_discriminator")
        if final_stride < 1:
            raise ValueError(f"patch_discriminator: final_stride must be >= 1, got {final_stride}")
        downs = _doublings(img_size, 8, "patch_discriminator")
        k, widths = (4, [ndf, 2 * ndf]) if layout == "official" else (3, [64, 128])
        widths = (widths + [widths[-1]] * downs)[:downs]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers.append(nn.Conv2d(c_in, c_out, k, stride=2, padding=1, bias=not (i or layout == "paper")))
            if i or layout == "paper":  # the official first block has no BN
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        head_k = 1 if layout == "official" else 3
        self.head = nn.Conv2d(c_in, 1, head_k, stride=final_stride, padding=head_k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageDiscriminator(nn.Module):
    """A full-image discriminator (MosaicKD appendix C.2's "full-image regularization"): stride-2 4x4 convs down to
    4 x 4, then one 4x4 conv to a single logit per image (B, 1, 1, 1)."""

    def __init__(self, img_size: int = 32, ndf: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        downs = _doublings(img_size, 4, "image_discriminator")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(downs):
            c_out = ndf * 2 ** min(i, 3)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=i == 0),
                       *([nn.BatchNorm2d(c_out)] if i else []), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("mosaic_generator")
def mosaic_generator(num_classes: int | None = None, **kw) -> Generator:
    """MosaicKD's generator (z_dim 100, ngf 64, layout official|paper, img_size 32/64/128 ...); outputs in [0, 1]."""
    return Generator(**kw)


@MODELS.register("patch_discriminator")
def patch_discriminator(num_classes: int | None = None, **kw) -> PatchDiscriminator:
    """MosaicKD's patch discriminator (ndf 128, final_stride 1-4, layout official|paper); patch logits."""
    return PatchDiscriminator(**kw)


@MODELS.register("image_discriminator")
def image_discriminator(num_classes: int | None = None, **kw) -> ImageDiscriminator:
    """A full-image DCGAN-style discriminator (one logit per image), the patch discriminator's ablation."""
    return ImageDiscriminator(**kw)
