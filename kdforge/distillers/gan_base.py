"""What every method over image generators shares (GAN training, generator distillation): the generator's input.

A generator is *conditional* when it maps an image to an image (pix2pix's U-Net: its input is `batch["image"]`)
and *unconditional* when it maps a code z (B, z_dim) to an image (DCGAN: it has an int attribute `z_dim`).
Generated images live in the generator's output space, [-1, 1] for tanh; recipes normalise real images into the
same space (data.mean = data.std = 0.5), so real and generated images compare as they are.

Training draws fresh codes from the global RNG (saved in checkpoints: a resumed run draws the same ones).
Evaluation uses `eval_codes`: sample `i` of the val split always gets the same code, whatever the batch size or
the run, so a teacher, a student and a baseline are scored on the same codes and `predict` is repeatable.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.engine import distributed
from kdforge.engine.optim import build_optimizer
from kdforge.models import build_model

#: added to a sample's index to seed its evaluation code, so the codes differ from any small seed a user picks
EVAL_CODE_SEED = 2_147_000_000


def z_dim_of(generator: nn.Module) -> int | None:
    """The code size of an unconditional generator, None for an image-to-image one."""
    z = getattr(generator, "z_dim", None)
    return z if isinstance(z, int) and not isinstance(z, bool) else None


def eval_codes(index: torch.Tensor, z_dim: int, device: torch.device | str) -> torch.Tensor:
    """(B, z_dim) codes, N(0, I), sample i's a function of i alone (seeded by i); no global RNG is touched."""
    rows = [torch.randn(z_dim, generator=torch.Generator().manual_seed(EVAL_CODE_SEED + int(i))) for i in index.cpu()]
    return torch.stack(rows).to(device)


def batch_codes(batch: dict[str, Any], z_dim: int, device: torch.device | str) -> torch.Tensor:
    """Fresh training codes, one per sample of the batch (its images, or a DataFree batch's `batch_size`)."""
    n = int(batch["batch_size"]) if "batch_size" in batch else int(batch["image"].shape[0])
    return distributed.randn(n, z_dim, device=device)  # this rank's block of the global batch's codes


def generator_input(generator: nn.Module, batch: dict[str, Any], *, train: bool) -> torch.Tensor:
    """What `generator` takes for this batch: the batch's image (conditional), or codes (unconditional):
    fresh ones in training, `eval_codes` of the batch's indices otherwise."""
    z_dim = z_dim_of(generator)
    if z_dim is None:
        if "image" not in batch:
            raise ValueError(f"{type(generator).__name__} is an image-to-image generator but the batch has no 'image'")
        return batch["image"]
    device = next(generator.parameters()).device
    if train:
        return batch_codes(batch, z_dim, device)
    index = batch.get("index")
    if index is None:  # codes by position would repeat in every batch: FID of 1 batch's worth of images
        raise ValueError("scoring an unconditional generator needs batch['index'] (sample i gets code i): use a "
                         "kdforge loader, or wrap the dataset in kdforge.data.IndexedDataset")
    return eval_codes(index, z_dim, device)


def real_images(batch: dict[str, Any]) -> torch.Tensor:
    """The real images generated ones are compared with: the paired target, else the batch's images."""
    return batch["target"] if "target" in batch else batch["image"]


def network(spec: str | nn.Module, options: dict[str, Any] | None, defaults: dict[str, Any], *, method: str,
            role: str) -> nn.Module:
    """A method's extra network (discriminator, energy model): a given module as it is, or one built by registered
    name with `defaults` (sizes read from the data) under the recipe's `<role>_options`."""
    if isinstance(spec, nn.Module):
        if options:
            raise ValueError(f"{method}: {role}_options apply to a {role} built by name, not to a given module")
        return spec
    return build_model(spec, **{**defaults, **(options or {})})


class GANTraining(Distiller):
    """Base of the GAN training loops (pix2pix, dcgan): the recipe's `student` is the generator G, trained alone
    against `discriminator`; both are stepped inside `training_step`, "generator" with the recipe's optimiser and
    "discriminator" with the same at `discriminator_lr` (default: the recipe's lr), both on the recipe's schedule.
    `predict` is G's image for the batch (`generator_input`: its image, or the sample's fixed code)."""

    needs_teacher = False
    trains_alone = True
    main_optimizer = None
    model_kind = "generator"

    def __init__(self, student: nn.Module, discriminator: nn.Module, discriminator_lr: float | None) -> None:
        super().__init__(student, None)  # a teacher, if given, is ignored (as scratch does)
        self.discriminator, self.discriminator_lr = discriminator, discriminator_lr

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "discriminator": self.discriminator}

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, Any]:
        gen = build_optimizer(self.student.parameters(), cfg)
        disc = build_optimizer(self.discriminator.parameters(), cfg, lr=self.discriminator_lr)
        return {"generator": gen, "discriminator": (disc, "")}  # "": the recipe's schedule for D too

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.student(generator_input(self.student, batch, train=False))
