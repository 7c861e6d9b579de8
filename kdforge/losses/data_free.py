"""Losses of the generator-based data-free baselines, as pure functions of logits and features.

DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks", Sec. 3): a generator is trained
against the frozen teacher with
    L_oh = (1/n) sum_i CE(y_T^i, argmax y_T^i)            the teacher is sure of every synthetic image
    L_a  = -(1/n) sum_i ||f_T^i||_1                        its penultimate features fire strongly
    L_ie = -H_info((1/n) sum_i softmax(y_T^i))             the batch covers the classes evenly
As in the official code (huawei-noah, DAFL_train.py), whose CIFAR weights (oh 1, a 0.1, ie 5) belong to these
scales, L_a averages |f| over every element (the paper's L_a divided by the feature width) and H_info is taken in
base 10 and not divided by the class count.

DFAD (Fang et al. 2019, "Data-Free Adversarial Distillation", Sec. 3): the mean absolute error between teacher
and student logits, which the student minimises and the generator maximises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


def _logits(x: Tensor, what: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected (B, num_classes) logits, got {tuple(x.shape)}")
    return x.float()


@LOSSES.register("one_hot_loss")
def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's L_oh: cross-entropy of the teacher's logits against their own argmax (pseudo-label), batch mean.
    Minimised by the generator: images the teacher classifies with confidence."""
    logits = _logits(teacher_logits, "one_hot_loss")
    return F.cross_entropy(logits, logits.argmax(dim=1))


@LOSSES.register("activation_loss")
def activation_loss(features: Tensor) -> Tensor:
    """DAFL's L_a as the official code computes it: minus the mean absolute value of the teacher's features
    (every element of the (B, ...) tensor). Minimised by the generator: strongly activated features."""
    return -features.float().abs().mean()


@LOSSES.register("information_entropy_loss")
def information_entropy_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's L_ie: sum_c p_c log10 p_c with p = the batch mean of softmax(teacher_logits), the NEGATIVE entropy
    (base 10, as the official code) of the teacher's marginal prediction. Minimised by the generator; its floor is
    -log10(C), at a uniform marginal (a class-balanced batch)."""
    p = F.softmax(_logits(teacher_logits, "information_entropy_loss"), dim=1).mean(dim=0)
    return (p * torch.log10(p.clamp_min(1e-12))).sum()


@LOSSES.register("logit_mae")
def logit_mae(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DFAD's L_MAE = (1 / (B C)) sum_{b,c} |s_bc - t_bc|: the mean absolute error between the logits (the official
    code's F.l1_loss). The student minimises it, the generator maximises it (minimises its negative)."""
    s, t = _logits(student_logits, "logit_mae"), _logits(teacher_logits, "logit_mae")
    if s.shape != t.shape:
        raise ValueError(f"logit_mae: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
    return (s - t).abs().mean()
