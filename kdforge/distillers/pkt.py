"""Passalis & Tefas 2018, "Learning deep representations with probabilistic knowledge transfer"."""
from __future__ import annotations

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.engine import distributed
from kdforge.losses import pkt_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("pkt")
class PKT(FeatureDistiller):
    """ce_weight * CE + kd_weight * KD + pkt_weight * KL between teacher and student cosine-kernel conditional
    distributions of the penultimate features.

    `pkt_loss` averages over all B^2 entries as the authors' code does, so the published pkt_weight 3e4 (CRD
    benchmark, batch 64) applies as it is. On the row-averaged KL of the paper the effective weight is
    pkt_weight / B, so a run at another batch size B wants about 3e4 * B / 64 for the same strength.
    """

    loss_names = ("pkt",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "auto:in",
                 teacher_layer: str = "auto:in", pkt_weight: float = 30000.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         weights={"pkt": pkt_weight}, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature)

    def feature_losses(self, s_feats, t_feats, batch):
        # the similarity distributions over the global batch (gathered over ranks under data parallel)
        return {"pkt": pkt_loss(*distributed.gather_batch(s_feats[0], t_feats[0]))}
