"""Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"."""
from __future__ import annotations

from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.distillers.feature_base import check_weights, logit_terms
from kdforge.registry import DISTILLERS


@DISTILLERS.register("kd")
class HintonKD(Distiller):
    """ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)).

    Both weights are additive; the defaults 0.1 and 0.9 are the usual convex mix ((1 - a) CE + a KD, a = 0.9).
    A weight of 0 leaves its term out.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 4.0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"kd: need temperature > 0, got {temperature}")
        check_weights("kd", ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def training_step(self, batch: Batch):
        t_logits, _ = self.run_teacher(batch)
        s_logits = self.student(batch["image"])
        return logit_terms(s_logits, t_logits, batch["label"], ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                           temperature=self.temperature)
