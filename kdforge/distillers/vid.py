"""Ahn et al. 2019, "Variational information distillation for knowledge transfer".

For each layer pair a small conv net predicts the mean of a Gaussian over the teacher feature from the
student feature, with one learned variance per channel: maximising the variational lower bound of the
mutual information is minimising that Gaussian's negative log-likelihood. Loss:

    ce_weight * CE + kd_weight * KD + vid_weight * sum over layer pairs of NLL(teacher | student)

A predicted mean and a teacher map of different spatial sizes are matched by `match_spatial` (the larger
pooled down to the smaller).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdforge.distillers.feature_base import FeatureDistiller, check_pairs
from kdforge.losses import match_spatial, vid_loss
from kdforge.registry import DISTILLERS


class _MeanPredictor(nn.Module):
    def __init__(self, c_in: int, c_out: int, init_var: float, eps: float) -> None:
        super().__init__()
        mid = max(c_in, c_out)
        self.net = nn.Sequential(nn.Conv2d(c_in, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 1), nn.ReLU(),
                                 nn.Conv2d(mid, c_out, 1))
        # softplus(log_scale) + eps == init_var at the start
        self.log_scale = nn.Parameter(torch.full((c_out,), math.log(math.expm1(init_var - eps))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@DISTILLERS.register("vid")
class VID(FeatureDistiller):
    loss_names = ("vid",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layers: Sequence[str] = ("layer3",),
                 teacher_layers: Sequence[str] = ("layer3",), vid_weight: float = 1.0, init_var: float = 5.0,
                 eps: float = 1e-5, ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__(student, teacher, student_layers=student_layers, teacher_layers=teacher_layers,
                         weights={"vid": vid_weight}, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature)
        s_shapes, t_shapes = self.feature_shapes(tuple(input_shape))
        check_pairs("vid", s_shapes, t_shapes, list(zip(self.student_features, self.teacher_features)))
        for name, s in zip(self.student_features, s_shapes):
            if len(s) != 4:
                raise ValueError(f"vid: feature {name!r} must be a 4-d map, got shape {tuple(s)}")
        self.predictors = nn.ModuleList(_MeanPredictor(s[1], t[1], init_var, eps) for s, t in zip(s_shapes, t_shapes))
        self.eps = eps

    def feature_losses(self, s_feats, t_feats, batch):
        total = 0.0
        for pred, s, t in zip(self.predictors, s_feats, t_feats):
            mu, t = match_spatial(pred(s), t)
            total = total + vid_loss(mu, t, pred.log_scale, self.eps)
        return {"vid": total}
