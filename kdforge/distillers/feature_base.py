"""Shared shape of the feature-based methods: ce_weight * CE + alpha * KD + beta * L_feat(student, teacher).

This is the common protocol of the CRD benchmark (Tian et al. 2020): every feature method may be
combined with the Hinton term; by default only CE and the method's own term are on (alpha = 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.losses import kd_div


class FeatureDistiller(Distiller):
    """Subclasses implement `feature_loss(student_feats, teacher_feats, batch)`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[str],
                 teacher_layers: Sequence[str], beta: float, ce_weight: float = 1.0, alpha: float = 0.0,
                 temperature: float = 4.0) -> None:
        if isinstance(student_layers, str):
            student_layers = [student_layers]
        if isinstance(teacher_layers, str):
            teacher_layers = [teacher_layers]
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"{type(self).__name__}: student_layers {list(student_layers)} and teacher_layers "
                             f"{list(teacher_layers)} must pair up one to one")
        self.student_features = tuple(student_layers)
        self.teacher_features = tuple(teacher_layers)
        super().__init__(student, teacher)
        self.beta, self.ce_weight, self.alpha, self.temperature = beta, ce_weight, alpha, temperature

    def feature_loss(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Batch):
        t_logits, t_feats = self.run_teacher(batch)
        s_logits, s_feats = self.run_student(batch["image"])
        out = {"ce": self.ce_weight * F.cross_entropy(s_logits, batch["label"])}
        if self.alpha:
            out["kd"] = self.alpha * kd_div(s_logits, t_logits.float(), self.temperature)
        out[self.loss_name] = self.beta * self.feature_loss(s_feats, [t.float() for t in t_feats], batch)
        return out

    loss_name: str = "feat"  # the key of the method's own term in the losses dict (and in metrics.jsonl)


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


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Resize the student map to the teacher's spatial size when they differ (adaptive average pooling)."""
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        return F.adaptive_avg_pool2d(s, t.shape[2:]) if s.shape[2] >= t.shape[2] else F.interpolate(
            s, size=t.shape[2:], mode="bilinear", align_corners=False)
    return s
