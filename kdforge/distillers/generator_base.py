"""Shared shape of the generator-based data-free methods (DAFL, DFAD): no training images at all.

The train loader is `kdforge.data.DataFree(steps, batch_size)` (a recipe's `data.data_free_steps`), whose batches
say only how many images to make; any other loader works too, its images are ignored and only its batch size is
used. The method draws z ~ N(0, I) itself (from the global RNG, so a resumed run draws the same codes), the
generator maps it to images in [0, 1], and these are normalised with `image_mean` / `image_std` (the data's, which
the teacher was trained with; filled from the loader) before the teacher and the student see them.

Two optimisers, both stepped inside `training_step` (`main_optimizer` is None): "student" (the recipe's optimiser
and schedule) and "generator" (Adam with `generator_lr`, `generator_betas` and `generator_schedule`: None for a
constant lr, "recipe" for the recipe's schedule, or a schedule name). `networks()` holds the generator, so
checkpoints keep it; `epoch_snapshot()` shows its images for fixed codes and the teacher's class histogram on them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.distillers.gan_base import network
from kdforge.engine import distributed
from kdforge.engine.optim import SCHEDULES, build_optimizer
from kdforge.models.state import keep_running_stats, no_weight_grads  # noqa: F401  (re-exported)
from kdforge.registry import did_you_mean

#: CIFAR-10's per-channel statistics, the normalisation of DAFL's and DFAD's official CIFAR teachers
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _img_size(method: str, img_size: int | None, input_shape: tuple[int, ...] | None) -> int:
    known = input_shape[-1] if input_shape else None
    if img_size is not None and known is not None and int(img_size) != int(known):
        raise ValueError(f"{method}: img_size={img_size} but the data's images are {tuple(input_shape)}; "
                         "drop img_size or make them agree")
    return int(img_size or known or 32)


class GeneratorDistiller(Distiller):
    """Base of DAFL and DFAD: builds the generator, its optimiser and the input normalisation (see module
    docstring). Subclasses implement `training_step` with `synthesize` and `batch_size_of`."""

    main_optimizer = None  # the student and the generator are both stepped inside training_step
    method = "generator_distiller"  # the name in error messages

    def __init__(self, student: nn.Module, teacher: nn.Module, *, generator: str | nn.Module,
                 generator_options: dict[str, Any] | None, input_shape: tuple[int, ...] | None,
                 img_size: int | None, image_mean: tuple[float, ...] | None, image_std: tuple[float, ...] | None,
                 generator_lr: float, generator_betas: tuple[float, float], generator_schedule: str | None,
                 snapshot_size: int) -> None:
        super().__init__(student, teacher)
        if generator_lr <= 0:
            raise ValueError(f"{self.method}: generator_lr must be > 0, got {generator_lr}")
        if generator_schedule is not None and generator_schedule != "recipe" and generator_schedule not in SCHEDULES:
            raise ValueError(f"{self.method}: unknown generator_schedule {generator_schedule!r}"
                             f"{did_you_mean(str(generator_schedule), [*SCHEDULES, 'recipe'])} (null: constant lr, "
                             f"'recipe': the train section's schedule, or one of {', '.join(SCHEDULES)})")
        size = _img_size(self.method, img_size, input_shape)
        self.generator = network(generator, generator_options, {"img_size": size}, method=self.method,
                                 role="generator")
        if not isinstance(getattr(self.generator, "z_dim", None), int):
            raise TypeError(f"{self.method}: the generator ({type(self.generator).__name__}) needs an int attribute "
                            "z_dim, the size of the codes it takes")
        self.z_dim: int = self.generator.z_dim
        self.input_shape = tuple(input_shape) if input_shape else None
        self.generator_lr, self.generator_betas = float(generator_lr), tuple(generator_betas)
        self.generator_schedule = generator_schedule
        mean, std = image_mean or CIFAR10_MEAN, image_std or CIFAR10_STD
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"{self.method}: image_mean {tuple(mean)} and image_std {tuple(std)} need one value per "
                             "channel each, and std > 0")
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        g = torch.Generator().manual_seed(0)  # the same codes every epoch (and no draw from the global RNG)
        self.register_buffer("snapshot_z", torch.randn(snapshot_size, self.z_dim, generator=g))

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "generator": self.generator}

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, Any]:
        student = [p for p in self.student.parameters() if p.requires_grad]
        schedule = "" if self.generator_schedule == "recipe" else self.generator_schedule  # "": the Trainer's own
        gen = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr, betas=self.generator_betas)
        return {"student": build_optimizer(student, cfg), "generator": (gen, schedule)}

    @staticmethod
    def batch_size_of(batch: Batch) -> int:
        """How many images a step makes: a DataFree batch says it; any other batch by its images."""
        if "batch_size" in batch:
            return int(batch["batch_size"])
        if "image" in batch:
            return int(batch["image"].shape[0])
        raise ValueError("a data-free batch needs 'batch_size' (kdforge.data.DataFree) or 'image' to count")

    def synthesize(self, n: int) -> torch.Tensor:
        """n generated images for fresh codes, normalised like the data (with grad to the generator)."""
        z = distributed.randn(n, self.z_dim, device=self.image_mean.device)  # this rank's block of the global draw
        x = self.generator(z)
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.method}: the generator makes {tuple(x.shape[1:])} images but the data's are "
                             f"{self.input_shape}: set img_size or generator_options")
        return (x - self.image_mean) / self.image_std

    @torch.no_grad()
    def epoch_snapshot(self) -> dict[str, Any]:
        """The generator's images for the fixed codes (a grid per epoch) and the teacher's class histogram on them."""
        was = self.generator.training
        self.generator.train()  # as in training: batch statistics, running statistics untouched
        try:
            with keep_running_stats(self.generator):
                images = self.generator(self.snapshot_z)
        finally:
            self.generator.train(was)
        logits, _ = self.run_teacher({}, (images - self.image_mean) / self.image_std)
        hist = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).tolist()
        return {"synthetic": images[:64].float().cpu(), "synthetic_class_hist": hist}
