"""Training without a teacher: cross-entropy only. `kdforge train` and the students' baselines use it."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.distillers.feature_base import check_weights
from kdforge.registry import DISTILLERS


@DISTILLERS.register("scratch")
class Scratch(Distiller):
    """ce_weight * CE(student(x), y), with optional label smoothing; the teacher, if given, is ignored."""

    needs_teacher = False
    trains_alone = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__(student, None)
        check_weights("scratch", ce_weight=ce_weight)
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing

    def training_step(self, batch: Batch):
        logits = self.student(batch["image"])
        return {"ce": self.ce_weight * F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)}
