"""Variational information distillation (VID)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


@LOSSES.register("vid_loss")
def vid_loss(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Gaussian negative log-likelihood of VID (Ahn et al. 2019, "Variational Information Distillation
    for Knowledge Transfer", sec. 3: Gaussian variational q with one variance per channel).

    The teacher feature t is modelled as N(mu(s), sigma^2) with mu(s) = `pred_mean` (a small network on
    the student feature, owned by the distiller) and one learned variance per channel:

        sigma_c^2 = softplus(alpha_c) + eps                     (softplus keeps it positive)
        L = mean_{b,c,h,w} 0.5 * ( (t - mu)^2 / sigma_c^2 + log sigma_c^2 )

    which is -log q(t | s) up to the constant 0.5*log(2*pi); minimising it maximises the variational
    lower bound on the mutual information I(t; s).

    Args:
        pred_mean: (B, C, ...) predicted mean mu(s).
        target: teacher feature, same shape as `pred_mean`.
        log_scale: (C,) unconstrained per-channel parameter alpha.
        eps: variance floor, keeps 1/sigma^2 bounded.
    """
    if pred_mean.shape != target.shape:
        raise ValueError(
            f"vid_loss: predicted mean {tuple(pred_mean.shape)} and target {tuple(target.shape)} "
            "must have the same shape"
        )
    if pred_mean.dim() < 2 or log_scale.shape != (pred_mean.shape[1],):
        raise ValueError(
            f"vid_loss: log_scale {tuple(log_scale.shape)} must be (C,) for features {tuple(pred_mean.shape)}"
        )
    var = F.softplus(log_scale) + eps
    var = var.view(1, -1, *([1] * (pred_mean.dim() - 2)))  # broadcast over batch and positions
    nll = 0.5 * ((target - pred_mean).pow(2) / var + var.log())
    return nll.mean()
