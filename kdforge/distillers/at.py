"""Zagoruyko & Komodakis 2017, "Paying more attention to attention" (activation-based AT)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.losses import at_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("at")
class AttentionTransfer(FeatureDistiller):
    """ce_weight * CE + kd_weight * KD + at_weight/2 * sum over layer pairs of mean ||Q_s/|Q_s| - Q_t/|Q_t|||^2,
    p = 2; at_weight 1000 is the paper's beta."""

    loss_names = ("at",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *,
                 student_layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 teacher_layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 at_weight: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=student_layers, teacher_layers=teacher_layers,
                         weights={"at": at_weight}, ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature)
        self.p = p

    def feature_losses(self, s_feats, t_feats, batch):
        return {"at": sum(at_loss(s, t, self.p) for s, t in zip(s_feats, t_feats)) / 2}
