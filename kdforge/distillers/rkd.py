"""Park et al. 2019, "Relational knowledge distillation" (distance-wise and angle-wise)."""
from __future__ import annotations

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.engine import distributed
from kdforge.losses import rkd_angle, rkd_distance
from kdforge.registry import DISTILLERS


@DISTILLERS.register("rkd")
class RKD(FeatureDistiller):
    """ce_weight * CE + kd_weight * KD + rkd_dist_weight * L_distance + rkd_angle_weight * L_angle on penultimate
    embeddings; 25 and 50 are the paper's weights (RKD-DA)."""

    loss_names = ("rkd_dist", "rkd_angle")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "auto:in",
                 teacher_layer: str = "auto:in", rkd_dist_weight: float = 25.0, rkd_angle_weight: float = 50.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         weights={"rkd_dist": rkd_dist_weight, "rkd_angle": rkd_angle_weight},
                         ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature)

    def feature_losses(self, s_feats, t_feats, batch):
        # relations among all the global batch's samples (gathered over ranks under data parallel)
        s, t = distributed.gather_batch(s_feats[0].flatten(1), t_feats[0].flatten(1))
        out = {}
        if self.weights["rkd_dist"]:
            out["rkd_dist"] = rkd_distance(s, t)
        if self.weights["rkd_angle"]:  # O(B^3): skipped when its weight is 0
            out["rkd_angle"] = rkd_angle(s, t)
        return out
