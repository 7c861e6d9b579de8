"""DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks").

No training data: a generator G, with the frozen teacher as its fixed discriminator, learns images the teacher
responds to as to its training set, and the student learns from the teacher on them. Each step, on one batch
x = G(z) (fresh z; see kdforge.distillers.generator_base for the loader, the normalisation and the optimisers):
  G:       oh_weight * L_oh + activation_weight * L_a + balance_weight * L_ie   (kdforge.losses.data_free)
           through the frozen teacher; L_a reads the teacher's features at `activation_layer` (default "auto:in",
           the input of its last nn.Linear: the pooled penultimate features)
  student: kd_weight * T^2 KL(teacher || student) on the same x, detached (teacher logits from the same pass)
Both terms come from one forward pass before either network is stepped, as in the official code (which sums them
into one backward), so each logged term depends on its own weight only.

Defaults, CIFAR (official code huawei-noah DAFL_train.py and its README's CIFAR-10 command): oh 1, a 0.1, ie 5,
KD at T = 1 (its kdloss has no temperature), generator Adam lr 0.02 (the code's default 0.2 is MNIST's), default
betas, constant lr; student SGD 0.1 (momentum 0.9, wd 5e-4, x0.1 at epochs 800 and 1600 of 2000 x 120 steps),
batch 1024, z_dim 1000. Those of the student are the recipe's (recipes/mosaic/cifar10/dafl_*.yaml).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.feature_base import check_weights
from kdforge.distillers.generator_base import GeneratorDistiller
from kdforge.engine import distributed
from kdforge.losses import kd_div
from kdforge.losses.data_free import activation_loss, information_entropy_loss, one_hot_loss
from kdforge.registry import DISTILLERS


def dafl_generator_terms(teacher_logits: torch.Tensor, teacher_features: torch.Tensor | None, *, oh_weight: float,
                         activation_weight: float, balance_weight: float) -> dict[str, torch.Tensor]:
    """The generator's weighted terms by name (their sum is its loss); a term of weight 0 is left out."""
    out: dict[str, torch.Tensor] = {}
    if oh_weight:
        out["oh"] = oh_weight * one_hot_loss(teacher_logits)
    if activation_weight:
        if teacher_features is None:
            raise ValueError("dafl: activation_weight > 0 needs the teacher's features")
        out["activation"] = activation_weight * activation_loss(teacher_features)
    if balance_weight:
        # the batch-mean prediction over the global batch (every rank's images, gathered, under data parallel)
        out["balance"] = balance_weight * information_entropy_loss(distributed.gather_batch(teacher_logits)[0])
    return out


@DISTILLERS.register("dafl")
class DAFL(GeneratorDistiller):
    method = "dafl"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, oh_weight: float = 1.0,
                 activation_weight: float = 0.1, balance_weight: float = 5.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, activation_layer: str = "auto:in",
                 generator: str | nn.Module = "mosaic_generator", generator_options: dict[str, Any] | None = None,
                 input_shape: tuple[int, ...] | None = None, img_size: int | None = None,
                 image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None,
                 generator_lr: float = 0.02, generator_betas: tuple[float, float] = (0.9, 0.999),
                 generator_schedule: str | None = None, snapshot_size: int = 256) -> None:
        check_weights("dafl", oh_weight=oh_weight, activation_weight=activation_weight,
                      balance_weight=balance_weight, kd_weight=kd_weight)
        if temperature <= 0:
            raise ValueError(f"dafl: need temperature > 0, got {temperature}")
        self.teacher_features = (activation_layer,) if activation_weight else ()
        super().__init__(student, teacher, generator=generator, generator_options=generator_options,
                         input_shape=input_shape, img_size=img_size, image_mean=image_mean, image_std=image_std,
                         generator_lr=generator_lr, generator_betas=generator_betas,
                         generator_schedule=generator_schedule, snapshot_size=snapshot_size)
        self.weights = dict(oh_weight=oh_weight, activation_weight=activation_weight, balance_weight=balance_weight)
        self.kd_weight, self.temperature = kd_weight, temperature

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.synthesize(self.batch_size_of(batch))
        t_logits, feats = self.run_teacher(batch, x, grad=True)
        terms = dafl_generator_terms(t_logits, feats[0] if feats else None, **self.weights)
        out = {k: v.detach() for k, v in terms.items()}
        if terms:
            self.optimizer_step("generator", sum(terms.values()))
        if self.kd_weight:
            kd = self.kd_weight * kd_div(self.student(x.detach()).float(), t_logits.detach().float(), self.temperature)
            out["kd"] = self.optimizer_step("student", kd)
        return out
