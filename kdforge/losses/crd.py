"""Contrastive representation distillation (CRD): NCE loss and critic scores."""
from __future__ import annotations

import torch
from torch import Tensor

from kdforge.registry import LOSSES

_EPS = 1e-7


def crd_scores(anchor: Tensor, others: Tensor, temperature: float) -> Tensor:
    """Unnormalised critic scores of Tian et al. 2020 (CRD, sec. 3): h = exp(<a, o_k> / tau).

    Args:
        anchor: (B, D) embeddings of one network (usually L2-normalised by the caller).
        others: (B, 1 + K, D) the positive (index 0) and K negatives from the other network / memory bank.
        temperature: tau > 0.
    Returns:
        (B, 1 + K) exp(<anchor_b, others_b,k> / tau). The distiller divides by its running estimate of Z
        before calling `crd_nce`.
    """
    if anchor.dim() != 2 or others.dim() != 3 or others.shape[0] != anchor.shape[0] \
            or others.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"crd_scores: anchor {tuple(anchor.shape)} must be (B, D) and others {tuple(others.shape)} "
            "must be (B, 1+K, D) with the same B and D"
        )
    if temperature <= 0:
        raise ValueError(f"crd_scores: temperature must be > 0, got {temperature}")
    dots = torch.bmm(others, anchor.unsqueeze(2)).squeeze(2)  # (B, 1+K)
    return torch.exp(dots / temperature)


@LOSSES.register("crd_nce")
def crd_nce(pos_scores: Tensor, neg_scores: Tensor, n_data: int) -> Tensor:
    """NCE loss of CRD (Tian et al. 2020, "Contrastive Representation Distillation", sec. 3).

    With K negatives drawn uniformly from the n_data training samples (noise P_n = 1/n_data) and
    scores h already normalised (h = exp(<f_s, f_t>/tau) / Z), the posterior that a pair came from the
    data rather than the noise is

        P(D=1 | h) = h / (h + K * P_n)

    and the loss is the binary NCE objective

        L = -mean_b [ log P(D=1 | h+_b) + sum_k log(1 - P(D=1 | h-_bk)) ]

    with eps = 1e-7 added inside each log so saturated scores do not give -inf.

    Args:
        pos_scores: (B,) (or (B, 1)) scores of the positive pairs.
        neg_scores: (B, K) scores of the negative pairs.
        n_data: size of the dataset the negatives are drawn from.
    """
    if pos_scores.dim() == 2 and pos_scores.shape[1] == 1:
        pos_scores = pos_scores.squeeze(1)
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(
            f"crd_nce: positive scores {tuple(pos_scores.shape)} must be (B,) and negative scores "
            f"{tuple(neg_scores.shape)} must be (B, K) with the same B"
        )
    if n_data <= 0:
        raise ValueError(f"crd_nce: n_data must be positive, got {n_data}")
    noise = neg_scores.shape[1] / n_data  # K * P_n
    p_pos = pos_scores / (pos_scores + noise)
    p_neg = neg_scores / (neg_scores + noise)
    log_pos = torch.log(p_pos + _EPS)
    log_neg = torch.log(1.0 - p_neg + _EPS).sum(dim=1)
    return -(log_pos + log_neg).mean()
