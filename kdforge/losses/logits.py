"""Losses on output logits."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


@LOSSES.register("kd_div")
def kd_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target loss of Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

        L = T^2 * (1/B) * sum_b sum_c p_t[b,c] * (log p_t[b,c] - log p_s[b,c]),
        p_t = softmax(z_t / T),  p_s = softmax(z_s / T)

    i.e. T^2 * KL(p_t || p_s), summed over classes and averaged over the batch ("batchmean"). The T^2
    factor keeps the gradient magnitude roughly independent of T (paper, section 2), so the soft term
    can be mixed with the hard-label cross-entropy without retuning its weight when T changes.

    Args:
        student_logits: (B, num_classes) raw student logits.
        teacher_logits: (B, num_classes) raw teacher logits, same shape.
        temperature: T > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_div: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.dim() != 2:
        raise ValueError(f"kd_div: expected (B, num_classes) logits, got {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"kd_div: temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    # Both sides in log space: exact where the teacher puts (numerically) zero mass on a class.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature**2)

