"""Shared shape of the feature-based methods:

    ce_weight * CE + kd_weight * T^2 KL + sum over the method's own terms X of X_weight * L_X(student, teacher)

This is the common protocol of the CRD benchmark (Tian et al. 2020): every feature method may be combined
with the Hinton term; by default only CE (weight 1) and the method's own terms are on (kd_weight = 0).

Every weight is additive and named for the term it weighs: term `X` of `training_step` (the name it has in
metrics.jsonl) is weighed by the option `X_weight`. A weight of 0 leaves its term out (not computed).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.losses import kd_div


def check_weights(method: str, **weights: float) -> None:
    """Loss weights are >= 0, and the terms trained together (one stage) must not all be 0."""
    for name, value in weights.items():
        if not value >= 0:  # also catches NaN
            raise ValueError(f"{method}: loss weights must be >= 0, got {name}={value}")
    if not any(weights.values()):
        given = ", ".join(f"{k}={v}" for k, v in weights.items())
        raise ValueError(f"{method}: every loss weight is 0 ({given}); nothing would be trained")


def logit_terms(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor, *,
                ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """{"ce": ce_weight * CE, "kd": kd_weight * T^2 KL(teacher || student)}, leaving out a term of weight 0."""
    out = {}
    if ce_weight:
        out["ce"] = ce_weight * F.cross_entropy(s_logits, labels)
    if kd_weight:
        out["kd"] = kd_weight * kd_div(s_logits, t_logits.float(), temperature)
    return out


class FeatureDistiller(Distiller):
    """Subclasses name their own terms in `loss_names`, take one `X_weight` option per term, pass the weights
    as `weights={X: X_weight}`, and implement `feature_losses(student_feats, teacher_feats, batch)`, which
    returns the unweighted terms by name."""

    loss_names: tuple[str, ...] = ("feat",)  # keys of the method's own terms in the losses dict and metrics.jsonl

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[str],
                 teacher_layers: Sequence[str], weights: dict[str, float], ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        if isinstance(student_layers, str):
            student_layers = [student_layers]
        if isinstance(teacher_layers, str):
            teacher_layers = [teacher_layers]
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"{type(self).__name__}: student_layers {list(student_layers)} and teacher_layers "
                             f"{list(teacher_layers)} must pair up one to one")
        if set(weights) != set(self.loss_names):
            raise TypeError(f"{type(self).__name__}: weights {sorted(weights)} must name its terms "
                            f"{list(self.loss_names)}")
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__}: need temperature > 0, got {temperature}")
        self.student_features = tuple(student_layers)
        self.teacher_features = tuple(teacher_layers)
        super().__init__(student, teacher)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.weights = dict(weights)
        check_weights(type(self).__name__, ce_weight=ce_weight, kd_weight=kd_weight,
                      **{f"{k}_weight": v for k, v in weights.items()})

    def feature_losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor],
                       batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        t_logits, t_feats = self.run_teacher(batch)
        s_logits, s_feats = self.run_student(batch["image"])
        out = logit_terms(s_logits, t_logits, batch["label"], ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                          temperature=self.temperature)
        if any(self.weights.values()):
            own = self.feature_losses(s_feats, [t.float() for t in t_feats], batch)
            out.update({k: self.weights[k] * v for k, v in own.items() if self.weights[k]})
        return out


def check_pairs(method: str, s_shapes: list[torch.Size], t_shapes: list[torch.Size], names: list[tuple[str, str]],
                *, same_channels: bool = False, same_spatial: bool = False) -> None:
    """Fail early, naming the layer pair, when tapped features cannot be compared."""
    for (s_name, t_name), s, t in zip(names, s_shapes, t_shapes):
        if len(s) != len(t):
            raise ValueError(f"{method}: student feature {s_name!r} {tuple(s)} and teacher feature {t_name!r} "
                             f"{tuple(t)} have different ranks")
        if same_channels and s[1] != t[1]:
            raise ValueError(f"{method}: channel mismatch between student {s_name!r} {tuple(s)} and teacher "
                             f"{t_name!r} {tuple(t)}")
        if same_spatial and tuple(s[2:]) != tuple(t[2:]):
            raise ValueError(f"{method}: spatial size mismatch between student {s_name!r} {tuple(s)} and teacher "
                             f"{t_name!r} {tuple(t)}")


def conv_regressor(c_in: int, c_out: int) -> nn.Module:
    """1x1 conv + BN: maps student channels to teacher channels (FitNet's regressor, convolutional form)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
