"""Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.losses import kd_div
from kdforge.registry import DISTILLERS


@DISTILLERS.register("kd")
class HintonKD(Distiller):
    """(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd: need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
        self.temperature, self.alpha = temperature, alpha

    def training_step(self, batch: Batch):
        t_logits, _ = self.run_teacher(batch)
        s_logits = self.student(batch["image"])
        return {"ce": (1 - self.alpha) * F.cross_entropy(s_logits, batch["label"]),
                "kd": self.alpha * kd_div(s_logits, t_logits.float(), self.temperature)}
