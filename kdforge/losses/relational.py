"""Relational losses: they match how samples relate to each other, so student and teacher dims may differ."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


def _flat_pair(
    name: str, student_feat: Tensor, teacher_feat: Tensor, min_batch: int
) -> tuple[Tensor, Tensor]:
    """Flatten both to (B, D_s) and (B, D_t); only the batch sizes must agree."""
    if student_feat.dim() < 2 or teacher_feat.dim() < 2 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"{name}: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            "must be (B, ...) with the same batch size"
        )
    if student_feat.shape[0] < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch}, got {student_feat.shape[0]}")
    return student_feat.flatten(1), teacher_feat.flatten(1)


@LOSSES.register("pkt_loss")
def pkt_loss(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", sec. 3, cosine-similarity kernel).

    Rows x_i are L2-normalised, K_ij = (x_i^T x_j + 1) / 2 maps cosine similarity to [0, 1], and each
    row is turned into a conditional distribution p_{j|i} = K_ij / sum_j' K_ij'. The loss is the KL
    divergence from the teacher's conditionals t to the student's s, normalised as in the authors' released
    code (and the CRD benchmark's, where the weight 3e4 at batch 64 was published): the mean over all B^2
    entries,

        L = (1/B^2) * sum_i sum_j t_{j|i} * log((t_{j|i} + eps) / (s_{j|i} + eps))

    i.e. 1/B times the row-averaged KL (sum over j, mean over i). With this form the published weight carries
    over unchanged; note that it is tied to the batch size it was tuned at (B = 64 for 3e4), since the
    row-averaged KL it scales is divided by B. The diagonal j = i is kept, as in the paper and the code.
    """
    s, t = _flat_pair("pkt_loss", student_feat, teacher_feat, min_batch=1)

    def conditional(x: Tensor) -> Tensor:
        x = F.normalize(x, p=2.0, dim=1)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)  # diagonal is 1, so every row sum is >= 1

    p_s, p_t = conditional(s), conditional(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()  # over all B^2 entries


def _off_diagonal(n: int, device: torch.device) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _normalised_distances(x: Tensor) -> Tensor:
    """Off-diagonal pairwise Euclidean distances (B*(B-1),), divided by their mean (RKD's mu)."""
    # Distances are translation invariant; centring first keeps |a|^2 + |b|^2 - 2ab from cancelling
    # catastrophically in float32 when the features sit far from the origin.
    x = x - x.mean(dim=0, keepdim=True)
    sq = x.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (x @ x.t())
    # Clamp before sqrt: the gradient of sqrt is infinite at 0 (coincident samples).
    d = d2.clamp_min(1e-12).sqrt()[_off_diagonal(x.shape[0], x.device)]
    return d / d.mean().clamp_min(1e-12)


@LOSSES.register("rkd_distance")
def rkd_distance(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Distance-wise RKD loss (Park et al. 2019, "Relational Knowledge Distillation", sec. 3.2).

        psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu,   mu = mean over pairs i != j of ||x_i - x_j||_2
        L_D = mean over ordered pairs i != j of huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))

    with huber = smooth_l1 (delta 1). Normalising by mu makes the loss invariant to a common scaling of
    either feature set. Inputs are flattened to (B, D). Note: the authors' code averages over all B^2
    entries including the zero diagonal; averaging over the B(B-1) real pairs is larger by B/(B-1).
    """
    s, t = _flat_pair("rkd_distance", student_feat, teacher_feat, min_batch=2)
    return F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))


def _angles(x: Tensor) -> Tensor:
    """cos of the angle at x_j in every triplet (x_i, x_j, x_k) of distinct points: (B(B-1)(B-2),)."""
    n = x.shape[0]
    # u[j, i] = unit vector from x_j to x_i; F.normalize clamps the norm, so coincident points give 0.
    u = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2.0, dim=2)
    cos = torch.bmm(u, u.transpose(1, 2))  # cos[j, i, k] = <u[j, i], u[j, k]>
    off = _off_diagonal(n, x.device)
    distinct = off.unsqueeze(2) & off.unsqueeze(1) & off.unsqueeze(0)  # j != i, j != k, i != k
    return cos[distinct]


@LOSSES.register("rkd_angle")
def rkd_angle(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Angle-wise RKD loss (Park et al. 2019, "Relational Knowledge Distillation", sec. 3.2).

        psi_A(x_i, x_j, x_k) = cos angle(x_i, x_j, x_k) = <e_ij, e_kj>,  e_ij = (x_i - x_j) / ||x_i - x_j||
        L_A = mean over triplets of distinct i, j, k of huber(psi_A(s) - psi_A(t))

    with huber = smooth_l1 (delta 1). Cost is O(B^2 D) memory, so pass pooled/embedded features.
    """
    s, t = _flat_pair("rkd_angle", student_feat, teacher_feat, min_batch=3)
    return F.smooth_l1_loss(_angles(s), _angles(t))


@LOSSES.register("rkd_loss")
def rkd_loss(
    student_feat: Tensor, teacher_feat: Tensor, dist_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """RKD-DA (Park et al. 2019): dist_weight * L_D + angle_weight * L_A, with the paper's weights 25 and 50.

    The `rkd` method returns the two terms separately (`rkd_dist`, `rkd_angle`) so each is logged."""
    return (dist_weight * rkd_distance(student_feat, teacher_feat)
            + angle_weight * rkd_angle(student_feat, teacher_feat))
