"""Pix2Pix (Isola et al., CVPR 2017, "Image-to-Image Translation with Conditional Adversarial Networks").

Trains an image-to-image generator G (the recipe's `student`, e.g. `unet_generator`) on paired batches, x =
`batch["image"]` (an edge map) and y = `batch["target"]` (the face; the image itself when a batch has no target),
against a conditional discriminator D(image | condition) (`patchgan_discriminator` by default). No teacher: this
is how a GAN teacher is trained (`kdforge train`). Each training step, on one batch and one G(x):
  1. D:  0.5 * (L(D(y | x), real) + L(D(G(x) | x), fake)), G(x) detached         (one D step per G step)
  2. G:  gan_weight * L(D(G(x) | x), real) + l1_weight * |G(x) - y|_1  through D, D's weights getting no gradient
where L is BCE on logits (`gan_loss: vanilla`, the paper's), the squared error to 1 / 0 (`lsgan`) or hinge
(kdforge.losses.gan); the paper's
lambda is l1_weight = 100. G's pass through D keeps D's BatchNorm statistics, so each step changes its own network.
Two optimisers, both stepped here (`main_optimizer` is None), both the recipe's optimiser and schedule (the paper:
Adam 2e-4, betas (0.5, 0.999), weight decay 0): "generator" at the recipe's lr, "discriminator" at
`discriminator_lr` (default: the same). Images are in [-1, 1] (tanh out; data.mean = data.std = 0.5).
`epoch_snapshot` shows, for the first `snapshot_size` samples of the first training batch (kept in a buffer, so
checkpoints hold it), input, G's output and target: three rows of a grid 8 wide when snapshot_size is 8.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.gan_base import GANTraining, network, real_images
from kdforge.engine import distributed
from kdforge.losses.gan import check_gan_loss, discriminator_loss, generator_loss
from kdforge.models.state import keep_running_stats, no_weight_grads
from kdforge.registry import DISTILLERS


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to [0, 1], for saved grids."""
    return (images.float() * 0.5 + 0.5).clamp(0, 1)


@DISTILLERS.register("pix2pix")
class Pix2Pix(GANTraining):

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *,
                 input_shape: tuple[int, ...] | None = None, discriminator: str | nn.Module = "patchgan_discriminator",
                 discriminator_options: dict[str, Any] | None = None, l1_weight: float = 100.0,
                 gan_weight: float = 1.0, gan_loss: str = "vanilla", discriminator_lr: float | None = None,
                 snapshot_size: int = 8) -> None:
        check_gan_loss("pix2pix", gan_loss)
        if min(l1_weight, gan_weight) < 0 or (discriminator_lr is not None and discriminator_lr <= 0):
            raise ValueError("pix2pix: l1_weight and gan_weight must be >= 0, discriminator_lr > 0")
        c_in, size = self._input_shape(student, input_shape)
        c_out = getattr(student, "out_channels", c_in)
        defaults = {"in_channels": c_out, "cond_channels": c_in, "img_size": size}
        super().__init__(student, network(discriminator, discriminator_options, defaults, method="pix2pix",
                                          role="discriminator"), discriminator_lr)
        self.l1_weight, self.gan_weight, self.gan_loss = float(l1_weight), float(gan_weight), gan_loss
        # the snapshot's fixed samples: filled from the first training batch, saved with the checkpoints
        self.register_buffer("snapshot_input", torch.zeros(snapshot_size, c_in, size, size))
        self.register_buffer("snapshot_target", torch.zeros(snapshot_size, c_out, size, size))
        self.register_buffer("snapshot_count", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _input_shape(student: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, int]:
        """(channels, side) of an input: the data's, else what the generator says it takes."""
        if input_shape is not None:
            return int(input_shape[0]), int(input_shape[-1])
        if hasattr(student, "in_channels") and hasattr(student, "img_size"):
            return int(student.in_channels), int(student.img_size)
        raise ValueError("pix2pix: pass input_shape=(C, H, W) of the inputs (the loader did not say it)")

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch["image"], real_images(batch)
        self._remember(x, y)
        fake = self.student(x)
        if fake.shape != y.shape:
            raise ValueError(f"pix2pix: the generator makes {tuple(fake.shape[1:])} images but the targets are "
                             f"{tuple(y.shape[1:])}")
        d = self.discriminator
        loss_d = 0.5 * discriminator_loss(d(y, x), d(fake.detach(), x), self.gan_loss)  # halved, as the paper
        disc = self.optimizer_step("discriminator", loss_d)

        with no_weight_grads(d), keep_running_stats(d):  # G's loss goes through D without training it
            gan = generator_loss(d(fake, x), self.gan_loss)
        terms = {"gan": self.gan_weight * gan, "l1": self.l1_weight * F.l1_loss(fake, y)}  # logged weighted
        self.optimizer_step("generator", sum(terms.values()))
        return {"disc": disc, **{k: v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def _remember(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if int(self.snapshot_count) == 0:
            x, y = distributed.gather_batch(x, y)  # the global batch's first samples, whichever rank holds them
            n = min(len(x), len(self.snapshot_input))
            self.snapshot_input[:n].copy_(x[:n])
            self.snapshot_target[:n].copy_(y[:n])
            self.snapshot_count.fill_(n)

    @torch.no_grad()
    def epoch_snapshot(self) -> dict[str, Any]:
        """Rows input | G(input) | target of the remembered samples, G in eval mode (no statistic, no RNG)."""
        n = int(self.snapshot_count)
        if n == 0:
            return {}
        was = self.student.training
        self.student.eval()
        try:
            x, y = self.snapshot_input[:n], self.snapshot_target[:n]
            rows = [x, self.student(x), y]
        finally:
            self.student.train(was)
        channels = max(r.shape[1] for r in rows)  # a grey input is shown as grey RGB beside RGB outputs
        return {"translation": torch.cat([to_unit(r.expand(-1, channels, -1, -1)) for r in rows])}
