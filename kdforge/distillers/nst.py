"""Huang & Wang 2017, "Like what you like: knowledge distill via neuron selectivity transfer"."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.losses import nst_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("nst")
class NST(FeatureDistiller):
    """CE + beta/2 * MMD^2 with the polynomial kernel (x^T y)^2 between per-channel activation maps."""
    loss_name = "nst"


    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[str] = ("layer3",),
                 teacher_layers: Sequence[str] = ("layer3",), beta: float = 50.0, alpha: float = 0.0,
                 temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=student_layers, teacher_layers=teacher_layers,
                         beta=beta, alpha=alpha, temperature=temperature)

    def feature_loss(self, s_feats, t_feats, batch):
        return sum(nst_loss(s, t) for s, t in zip(s_feats, t_feats)) / 2
