"""Losses on intermediate feature maps: FitNet hints, attention transfer, neuron selectivity transfer, and
`match_spatial`, the one rule for maps of different spatial sizes."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_maps(name: str, student_feat: Tensor, teacher_feat: Tensor) -> None:
    """Both are (B, C, H, W) with the same B; C, H and W may differ."""
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ValueError(
            f"{name}: expected (B, C, H, W) feature maps, got student {_shape(student_feat)} "
            f"and teacher {_shape(teacher_feat)}"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"{name}: batch sizes differ: student {_shape(student_feat)} vs teacher {_shape(teacher_feat)}"
        )


def match_spatial(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """kdforge's one rule for comparing feature maps of different spatial sizes: on each axis, the larger map
    is adaptive-average-pooled down to the smaller size; a map already at that size is returned unchanged.

    Used by every loss and method that compares maps (AT, NST, FitNet's hint, VID). Pooling the larger map
    rather than upsampling the smaller adds no invented detail, and is the usual practice between stages of
    different resolution. Both are (B, C, H, W), channel counts may differ; tensors without spatial axes
    ((B, D) pooled features) are returned as they are.

    >>> import torch
    >>> s, t = match_spatial(torch.ones(2, 3, 8, 8), torch.ones(2, 5, 4, 4))
    >>> tuple(s.shape), tuple(t.shape)
    ((2, 3, 4, 4), (2, 5, 4, 4))
    """
    if student_feat.shape[2:] == teacher_feat.shape[2:]:
        return student_feat, teacher_feat
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ValueError(f"match_spatial: cannot match the spatial sizes of student {_shape(student_feat)} and "
                         f"teacher {_shape(teacher_feat)}; both must be (B, C, H, W) maps")
    (hs, ws), (ht, wt) = student_feat.shape[2:], teacher_feat.shape[2:]
    size = (min(hs, ht), min(ws, wt))
    if tuple(student_feat.shape[2:]) != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    if tuple(teacher_feat.shape[2:]) != size:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return student_feat, teacher_feat


@LOSSES.register("hint_mse")
def hint_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNet hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", eq. 3).

        L_HT = mean over all elements of (r(u_s) - v_t)^2

    where r(u_s) is the student's guided-layer output after the regressor (applied by the caller,
    so `student_feat` must already have the teacher's shape) and v_t the teacher's hint layer. The
    paper writes 1/2 * ||.||^2; we use the mean, which only rescales the weight and is independent
    of the feature size.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_mse: regressed student feature {_shape(student_feat)} and teacher feature "
            f"{_shape(teacher_feat)} must have the same shape (is the regressor's output size right?)"
        )
    return F.mse_loss(student_feat, teacher_feat)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

        F(A) = (1/C) * sum_c |A_c|^p          (section 3.1, F^p_sum up to the 1/C factor)
        Q    = vec(F(A)) / ||vec(F(A))||_2    (eq. 2)

    Args:
        feat: (B, C, *spatial) activations.
        p: exponent; p=2 is the paper's default.
    Returns:
        (B, prod(spatial)) L2-normalised attention vectors.
    """
    if feat.dim() < 3:
        raise ValueError(f"attention_map: expected (B, C, H, W) features, got {_shape(feat)}")
    am = feat.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(am, p=2.0, dim=1)


@LOSSES.register("at_loss")
def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis 2017, eq. 2, with the squared-error form).

        L_AT = mean_{b, j} (Q_s[b, j] - Q_t[b, j])^2,   Q = attention_map(feature, p)

    The paper uses the L2 norm of the difference; the authors' released code (and most reproductions)
    use the mean squared difference, which we follow so published weights (e.g. 1000) carry over.
    Channel counts may differ (the map averages over channels); spatial sizes are matched by
    `match_spatial` (the larger map pooled down to the smaller).
    """
    _check_maps("at_loss", student_feat, teacher_feat)
    student_feat, teacher_feat = match_spatial(student_feat, teacher_feat)
    q_s = attention_map(student_feat, p)
    q_t = attention_map(teacher_feat, p)
    return (q_s - q_t).pow(2).mean()


@LOSSES.register("nst_loss")
def nst_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like", sec. 3).

    Each channel's spatial map is flattened to a vector of length H*W and L2-normalised, giving sets
    {s_i} (C_s vectors) and {t_j} (C_t vectors) per sample. With the polynomial kernel
    k(x, y) = (x^T y)^2 (the paper's polynomial kernel with d=2, c=0):

        MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)

    averaged over the batch. Channel counts may differ; spatial sizes are matched by `match_spatial`
    (the larger map pooled down to the smaller) so the vectors live in the same space.
    """
    _check_maps("nst_loss", student_feat, teacher_feat)
    student_feat, teacher_feat = match_spatial(student_feat, teacher_feat)
    s = F.normalize(student_feat.flatten(2), p=2.0, dim=2)  # (B, C_s, HW)
    t = F.normalize(teacher_feat.flatten(2), p=2.0, dim=2)  # (B, C_t, HW)
    k_ss = s.bmm(s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_tt = t.bmm(t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    k_st = s.bmm(t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
    return (k_ss + k_tt - 2.0 * k_st).mean()
