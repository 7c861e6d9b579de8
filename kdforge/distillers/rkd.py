"""Park et al. 2019, "Relational knowledge distillation" (distance-wise and angle-wise)."""
from __future__ import annotations

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.losses import rkd_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("rkd")
class RKD(FeatureDistiller):
    """CE + beta * (w_dist * L_distance + w_angle * L_angle) on penultimate embeddings."""
    loss_name = "rkd"


    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "auto:in",
                 teacher_layer: str = "auto:in", beta: float = 1.0, w_dist: float = 25.0, w_angle: float = 50.0,
                 alpha: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         beta=beta, alpha=alpha, temperature=temperature)
        self.w_dist, self.w_angle = w_dist, w_angle

    def feature_loss(self, s_feats, t_feats, batch):
        return rkd_loss(s_feats[0].flatten(1), t_feats[0].flatten(1), self.w_dist, self.w_angle)
