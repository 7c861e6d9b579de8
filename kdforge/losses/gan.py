"""GAN losses on a discriminator's logits (one per image, or a PatchGAN's map: averaged either way), shared by the
GAN training loops (pix2pix, dcgan) and the generator distillers' optional adversarial term (gan_kd and its
add-ons).

    kind      discriminator (real x, fake G(z))                     generator
    hinge     mean relu(1 - D(x)) + mean relu(1 + D(G(z)))          -mean D(G(z))        SN-GAN, SAGAN
    vanilla   BCE(D(x), 1) + BCE(D(G(z)), 0)                        BCE(D(G(z)), 1)      non-saturating (pix2pix)
    lsgan     mean (D(x) - 1)^2 + mean D(G(z))^2                    mean (D(G(z)) - 1)^2 Mao et al. 2017
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.registry import LOSSES

GAN_LOSSES = ("hinge", "vanilla", "lsgan")


def check_gan_loss(method: str, kind: str, allowed: tuple[str, ...] = GAN_LOSSES) -> str:
    if kind not in allowed:
        raise ValueError(f"{method}: gan_loss must be one of {', '.join(allowed)}, got {kind!r}")
    return kind


def _towards(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """How far the logits are from saying `real` (vanilla / lsgan)."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


@LOSSES.register("gan_discriminator_loss")
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss (the table above); the fake images' logits must come from detached images."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return _towards(real_logits, True, kind) + _towards(fake_logits, False, kind)


@LOSSES.register("gan_generator_loss")
def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's loss (the table above), through a discriminator whose weights it must not train."""
    if kind == "hinge":
        return -fake_logits.mean()
    return _towards(fake_logits, True, kind)
