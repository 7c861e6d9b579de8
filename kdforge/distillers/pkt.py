"""Passalis & Tefas 2018, "Learning deep representations with probabilistic knowledge transfer"."""
from __future__ import annotations

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.losses import pkt_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("pkt")
class PKT(FeatureDistiller):
    """CE + beta * KL between teacher and student cosine-kernel conditional distributions (penultimate)."""
    loss_name = "pkt"


    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "auto:in",
                 teacher_layer: str = "auto:in", beta: float = 30000.0, alpha: float = 0.0,
                 temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         beta=beta, alpha=alpha, temperature=temperature)

    def feature_loss(self, s_feats, t_feats, batch):
        return pkt_loss(s_feats[0], t_feats[0])
