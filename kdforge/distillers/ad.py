"""Adversarial debiasing (Zhang, Lemoine & Mitchell 2018), as the MFD paper runs it as a baseline ("AD").

One adversary per class (a 2-layer MLP, hidden 32) reads the student's logits of that class's samples and
predicts the group. It is trained by its own optimiser (Adam, `adv_lr` 3e-3 as in the MFD supplement; the
official code uses 3e-4) inside the step; the student minimises CE while a gradient-reversal layer makes it
maximise the adversary's loss:
    ce_weight * CE + adv_weight * CE(adversary_y(GRL(logits)), group)
        (+ kd_weight * T^2 KL with a teacher: AD+HKD; + hint_weight * FitNet's hint at `student_layer` through a
        regressor to the teacher's `teacher_layer`: AD+FitNet, the one-stage hint added to AD's objective).
The logged `adv` term is the adversary's loss as the student sees it; its gradient reaches the student negated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.distillers.feature_base import check_pairs, conv_regressor
from kdforge.losses import hint_mse, kd_div, match_spatial
from kdforge.registry import DISTILLERS


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015)."""
    return _ReverseGrad.apply(x)


class ClassAdversaries(nn.Module):
    """`num_classes` independent MLPs (in -> hidden -> num_groups) evaluated at once: sample i goes through the
    adversary of its class `labels[i]` (batched weights, no Python loop over classes)."""

    def __init__(self, num_classes: int, in_dim: int, num_groups: int, hidden: int = 32) -> None:
        super().__init__()
        def init(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default init, per class
            bound = fan_in ** -0.5
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.w1, self.b1 = init(num_classes, in_dim, hidden, fan_in=in_dim), init(num_classes, hidden, fan_in=in_dim)
        self.w2, self.b2 = init(num_classes, hidden, num_groups, fan_in=hidden), init(num_classes, num_groups,
                                                                                     fan_in=hidden)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.relu(torch.bmm(x.unsqueeze(1), self.w1[labels]).squeeze(1) + self.b1[labels])
        return torch.bmm(h.unsqueeze(1), self.w2[labels]).squeeze(1) + self.b2[labels]


@DISTILLERS.register("ad")
class AdversarialDebiasing(Distiller):
    needs_teacher = False  # AD alone; with a teacher and kd_weight > 0 it is AD+HKD

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, num_classes: int, num_groups: int,
                 adv_weight: float = 2.0, adv_lr: float = 3e-3, adv_hidden: int = 32, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 3.0, hint_weight: float = 0.0,
                 student_layer: str = "auto:in", teacher_layer: str = "auto:in",
                 input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        if hint_weight:
            self.student_features, self.teacher_features = (student_layer,), (teacher_layer,)
        super().__init__(student, teacher)
        if (kd_weight or hint_weight) and teacher is None:
            raise ValueError("ad: kd_weight > 0 (AD+HKD) and hint_weight > 0 (AD+FitNet) need a teacher")
        if min(adv_weight, ce_weight, kd_weight, hint_weight) < 0 or adv_lr <= 0:
            raise ValueError("ad: weights must be >= 0 and adv_lr > 0")
        self.hint_weight = hint_weight
        if hint_weight:
            (s,), (t,) = self.feature_shapes(tuple(input_shape))
            check_pairs("ad", [s], [t], [(student_layer, teacher_layer)])
            self.regressor = conv_regressor(s[1], t[1]) if len(s) == 4 else nn.Linear(s[1], t[1])
        self.adversary = ClassAdversaries(num_classes, num_classes, num_groups, adv_hidden)
        self.adv_weight, self.adv_lr, self.ce_weight, self.kd_weight = adv_weight, adv_lr, ce_weight, kd_weight
        self.temperature = temperature

    def trainable_modules(self) -> dict[str, nn.Module]:  # the adversary has its own optimiser
        return {"student": self.student, **({"regressor": self.regressor} if self.hint_weight else {})}

    def configure_optimizers(self, stage, cfg, steps):
        opts = super().configure_optimizers(stage, cfg, steps)
        opts["adversary"] = (torch.optim.Adam(self.adversary.parameters(), lr=self.adv_lr), None)
        return opts

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if "group" not in batch:
            raise ValueError("ad needs batch['group'] (the sensitive attribute of each sample)")
        y, g = batch["label"], batch["group"]
        logits, s_feats = self.run_student(batch["image"])
        # the adversaries learn to read the group from the (fixed) logits ...
        self.optimizer_step("adversary", F.cross_entropy(self.adversary(logits.detach().float(), y), g))
        # ... and the student learns logits they cannot read, through the reversed gradient
        adv = F.cross_entropy(self.adversary(reverse_grad(logits.float()), y), g)
        out = {"ce": self.ce_weight * F.cross_entropy(logits, y), "adv": self.adv_weight * adv}
        if self.kd_weight or self.hint_weight:
            t_logits, t_feats = self.run_teacher(batch)
            if self.kd_weight:
                out["kd"] = self.kd_weight * kd_div(logits, t_logits.float(), self.temperature)
            if self.hint_weight:
                out["hint"] = self.hint_weight * hint_mse(*match_spatial(self.regressor(s_feats[0]), t_feats[0]))
        return out
