"""Training without a teacher: cross-entropy only. `kdforge train` and the students' baselines use it."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.registry import DISTILLERS


@DISTILLERS.register("scratch")
class Scratch(Distiller):
    """CE(student(x), y), with optional label smoothing; the teacher, if given, is ignored."""

    needs_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, label_smoothing: float = 0.0):
        super().__init__(student, None)
        self.label_smoothing = label_smoothing

    def training_step(self, batch: Batch):
        logits = self.student(batch["image"])
        return {"ce": F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)}
