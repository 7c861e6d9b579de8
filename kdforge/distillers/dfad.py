"""DFAD (Fang, Song, Shen, Wang, Chen & Song 2019, "Data-Free Adversarial Distillation").

No training data: a min-max game in which the generator G looks for images on which student and teacher disagree
most and the student learns to agree with the teacher on them. The discrepancy is the mean absolute error between
their logits (kdforge.losses.data_free.logit_mae). Each step (see kdforge.distillers.generator_base for the loader,
the normalisation and the optimisers):
  student, `student_steps` times, fresh z each:  mae_weight * MAE(s(x), t(x)),   x = G(z) without grad
  G, once, fresh z:                              adv_weight * -MAE(s(G(z)), t(G(z)))  through the frozen teacher
                                                 and student (no weight grads, BN running statistics kept)
The logged `mae` is the mean of the student's steps, `adv` the generator's loss. The student's steps change the
networks the generator's step sees, so `adv` depends on `mae_weight` too (a game: tests/test_data_free.py checks the
weights on the pure losses).

Defaults, CIFAR (official code VainF/Data-Free-Adversarial-Distillation DFAD_cifar.py and its README command):
5 student steps per generator step, generator Adam lr 1e-3 (default betas) following the student's schedule
(--scheduler: both x0.1 at epochs 100 and 200 of 500 x 50 steps); student SGD 0.1 (momentum 0.9, wd 5e-4),
batch 256, z_dim 256. Those of the student are the recipe's (recipes/mosaic/cifar10/dfad_*.yaml).
Unlike the official loop, the generator's step does not update the student's BN running statistics, and the
student's steps do not update the generator's: each optimiser's step changes its own network only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.generator_base import GeneratorDistiller, keep_running_stats, no_weight_grads
from kdforge.losses.data_free import logit_mae
from kdforge.registry import DISTILLERS


@DISTILLERS.register("dfad")
class DFAD(GeneratorDistiller):
    method = "dfad"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mae_weight: float = 1.0, adv_weight: float = 1.0,
                 student_steps: int = 5, generator: str | nn.Module = "mosaic_generator",
                 generator_options: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
                 img_size: int | None = None, image_mean: tuple[float, ...] | None = None,
                 image_std: tuple[float, ...] | None = None, generator_lr: float = 1e-3,
                 generator_betas: tuple[float, float] = (0.9, 0.999), generator_schedule: str | None = "recipe",
                 snapshot_size: int = 256) -> None:
        if not mae_weight > 0 or not adv_weight >= 0:
            raise ValueError(f"dfad: need mae_weight > 0 (the student's only loss) and adv_weight >= 0, got "
                             f"mae_weight={mae_weight}, adv_weight={adv_weight}")
        if int(student_steps) != student_steps or student_steps < 1:
            raise ValueError(f"dfad: student_steps must be an integer >= 1, got {student_steps}")
        super().__init__(student, teacher, generator=generator, generator_options=generator_options,
                         input_shape=input_shape, img_size=img_size, image_mean=image_mean, image_std=image_std,
                         generator_lr=generator_lr, generator_betas=generator_betas,
                         generator_schedule=generator_schedule, snapshot_size=snapshot_size)
        self.mae_weight, self.adv_weight, self.student_steps = mae_weight, adv_weight, int(student_steps)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        n = self.batch_size_of(batch)
        mae = self.image_mean.new_zeros(())
        for _ in range(self.student_steps):
            with torch.no_grad(), keep_running_stats(self.generator):  # G's statistics follow its own step only
                x = self.synthesize(n)
                t_logits, _ = self.run_teacher(batch, x)
            loss = self.mae_weight * logit_mae(self.student(x), t_logits)
            mae = mae + self.optimizer_step("student", loss)
        out = {"mae": mae / self.student_steps}
        if self.adv_weight:
            x = self.synthesize(n)
            with no_weight_grads(self.student), keep_running_stats(self.student):
                t_logits, _ = self.run_teacher(batch, x, grad=True)
                adv = -self.adv_weight * logit_mae(self.student(x), t_logits)
            out["adv"] = self.optimizer_step("generator", adv)
        return out
