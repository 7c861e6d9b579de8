"""Huang & Wang 2017, "Like what you like: knowledge distill via neuron selectivity transfer"."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.losses import nst_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("nst")
class NST(FeatureDistiller):
    """ce_weight * CE + kd_weight * KD + nst_weight/2 * MMD^2 with the polynomial kernel (x^T y)^2 between
    per-channel activation maps, summed over layer pairs."""

    loss_names = ("nst",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[str] = ("layer3",),
                 teacher_layers: Sequence[str] = ("layer3",), nst_weight: float = 50.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__(student, teacher, student_layers=student_layers, teacher_layers=teacher_layers,
                         weights={"nst": nst_weight}, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature)

    def feature_losses(self, s_feats, t_feats, batch):
        return {"nst": sum(nst_loss(s, t) for s, t in zip(s_feats, t_feats)) / 2}
