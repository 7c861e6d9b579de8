"""Unconditional GAN training (DCGAN, Radford et al. 2016; hinge loss and spectral norm as SN-GAN, Miyato et al.
2018, and SAGAN, Zhang et al. 2019): how an unconditional GAN teacher is trained (`kdforge train`).

The recipe's `student` is the generator G (an int attribute `z_dim`, forward(z); `dcgan_generator`); the
discriminator D gives one logit per image (`sn_discriminator` by default). The batch's images are the real ones.
Each training step takes one loader batch, split into `d_steps` chunks (give the loader d_steps x the per-step
batch; each real image is seen once an epoch, and resume stays exact):
  1. D, once per chunk: fresh z (as many as the chunk), G(z) without grad, and
        discriminator_loss(D(x), D(G(z)), gan_loss)     (kdforge.losses.gan: hinge, vanilla or lsgan)
  2. G: fresh z (as many as a chunk) and, through D (D's weights get no gradient),
        generator_loss(D(G(z)), gan_loss)             (hinge: -mean D(G(z)); vanilla: non-saturating BCE)
Codes come from the global RNG (`gan_base.generator_input`), saved in checkpoints, so a resumed run draws the same.
G's BatchNorm statistics move in its own step only (D's spectral-norm power iteration runs in every training
forward, G's step included, as in SN-GAN). Two optimisers, both stepped here: "generator" (the recipe's:
Adam 2e-4, (0.5, 0.999) as DCGAN; SAGAN's TTUR is lr 1e-4 with discriminator_lr 4e-4) and "discriminator" (the
recipe's optimiser at `discriminator_lr`, default the recipe's lr), both on the recipe's schedule.
`predict` makes one image per val sample from its fixed code (`gan_base.eval_codes`); `epoch_snapshot` shows
`snapshot_size` images of fixed codes drawn once from their own seed (a buffer), G in eval mode.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.gan_base import GANTraining, generator_input, network, z_dim_of
from kdforge.distillers.pix2pix import to_unit
from kdforge.losses.gan import check_gan_loss, discriminator_loss, generator_loss
from kdforge.models.state import keep_running_stats, no_weight_grads
from kdforge.registry import DISTILLERS


@DISTILLERS.register("dcgan")
class DCGAN(GANTraining):

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *,
                 input_shape: tuple[int, ...] | None = None, discriminator: str | nn.Module = "sn_discriminator",
                 discriminator_options: dict[str, Any] | None = None, gan_loss: str = "hinge", d_steps: int = 1,
                 discriminator_lr: float | None = None, snapshot_size: int = 64, snapshot_seed: int = 0) -> None:
        z_dim = z_dim_of(student)
        if z_dim is None:
            raise TypeError(f"dcgan: the generator ({type(student).__name__}) needs an int attribute z_dim")
        check_gan_loss("dcgan", gan_loss)
        if d_steps < 1 or (discriminator_lr is not None and discriminator_lr <= 0):
            raise ValueError(f"dcgan: d_steps must be >= 1 and discriminator_lr > 0, got {d_steps}, {discriminator_lr}")
        channels = input_shape[0] if input_shape else getattr(student, "out_channels", 3)
        size = input_shape[-1] if input_shape else getattr(student, "img_size", 32)
        defaults = {"in_channels": channels, "img_size": size}
        super().__init__(student, network(discriminator, discriminator_options, defaults, method="dcgan",
                                          role="discriminator"), discriminator_lr)
        self.gan_loss, self.d_steps = gan_loss, int(d_steps)
        g = torch.Generator().manual_seed(snapshot_seed)  # fixed codes, without touching the global RNG
        self.register_buffer("snapshot_z", torch.randn(snapshot_size, z_dim, generator=g))

    def _fake(self, like: torch.Tensor) -> torch.Tensor:
        """G's images for fresh codes, as many as `like` has images."""
        fake = self.student(generator_input(self.student, {"image": like}, train=True))
        if fake.shape[1:] != like.shape[1:]:
            raise ValueError(f"dcgan: the generator makes {tuple(fake.shape[1:])} images but the data's are "
                             f"{tuple(like.shape[1:])}: set student.img_size (or data.resize)")
        return fake

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        real = batch["image"]
        if len(real) < self.d_steps:
            raise ValueError(f"dcgan: a batch of {len(real)} images cannot feed d_steps={self.d_steps} D steps")
        chunks = real.chunk(self.d_steps)
        d, disc = self.discriminator, real.new_zeros(())
        for chunk in chunks:
            with torch.no_grad(), keep_running_stats(self.student):  # G's statistics move in its own step only
                fake = self._fake(chunk)
            disc = disc + self.optimizer_step("discriminator", discriminator_loss(d(chunk), d(fake), self.gan_loss))

        with no_weight_grads(d), keep_running_stats(d):  # G's loss goes through D without training it
            gen = generator_loss(d(self._fake(chunks[0])), self.gan_loss)
        self.optimizer_step("generator", gen)
        return {"disc": disc / len(chunks), "gen": gen.detach()}

    @torch.no_grad()
    def epoch_snapshot(self) -> dict[str, Any]:
        """G's images for the fixed codes, in eval mode (running statistics, no RNG)."""
        was = self.student.training
        self.student.eval()
        try:
            return {"samples": to_unit(self.student(self.snapshot_z))}
        finally:
            self.student.train(was)
