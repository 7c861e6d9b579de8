"""The generator's and discriminator's terms of MosaicKD (Fang et al., NeurIPS 2021, "Mosaicking to Distill:
Knowledge Distillation from Out-of-Domain Data"), as pure functions of logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES


@LOSSES.register("class_balance")
def class_balance(teacher_logits: Tensor) -> Tensor:
    """sum_c p_c log2 p_c with p = the batch mean of softmax(teacher_logits): the NEGATIVE entropy, in bits, of
    the teacher's marginal prediction over the batch (appendix Eq. 1; the official code uses log2). Minimising it
    spreads the synthetic batch over the classes; its minimum is -log2(C), at a uniform marginal."""
    p = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (p * torch.log2(p.clamp_min(1e-12))).sum()


@LOSSES.register("prediction_entropy")
def prediction_entropy(teacher_logits: Tensor) -> Tensor:
    """mean_b H(softmax(teacher_logits_b)) in nats: MosaicKD's L_align. Minimising it makes every synthetic sample
    one the teacher classifies confidently, i.e. "globally legitimate" in-domain."""
    logp = F.log_softmax(teacher_logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


@LOSSES.register("negative_kl")
def negative_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """-KL(p_t || p_s) at temperature T (batch mean, no T^2): MosaicKD's adversarial L_adv, which the generator
    MINIMISES to find samples on which teacher and student disagree (the max step of the min-max game)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return -(log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


@LOSSES.register("patch_gan_loss")
def patch_gan_loss(logits: Tensor, real: bool) -> Tensor:
    """Binary cross-entropy of a discriminator's logits against "real" (1) or "fake" (0), SUMMED over each image's
    patch map and averaged over the batch, as the official code weighs it: a discriminator with more patches
    gives proportionally more signal. logits: (B, 1, h, w) patch logits, or (B, 1, 1, 1) / (B,) for a full-image
    discriminator. The discriminator's loss is the mean of the real and fake terms, the generator's L_local the
    fake-as-real term."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
    return bce / logits.shape[0]


def generator_terms(teacher_logits: Tensor, student_logits: Tensor, disc_logits: Tensor | None, *,
                    adv_weight: float, align_weight: float, local_weight: float, balance_weight: float,
                    temperature: float = 1.0, balance_logits: Tensor | None = None) -> dict[str, Tensor]:
    """The generator's weighted terms, by name (their sum is its loss):
        adv     = adv_weight     * -KL(p_t || p_s)              disagreement, the DRO "max"
        align   = align_weight   * mean entropy of p_t         in-domain for the teacher
        local   = local_weight   * patch BCE(D(x), real)       locally like the OOD patches (needs disc_logits)
        balance = balance_weight * sum p_bar log2 p_bar        the batch covers the classes
    A term whose weight is 0 is left out (not computed). `balance_logits`: the teacher logits p_bar averages
    (default `teacher_logits`; under data parallel, the global batch's)."""
    out: dict[str, Tensor] = {}
    if adv_weight:
        out["adv"] = adv_weight * negative_kl(student_logits, teacher_logits, temperature)
    if align_weight:
        out["align"] = align_weight * prediction_entropy(teacher_logits)
    if local_weight:
        if disc_logits is None:
            raise ValueError("generator_terms: local_weight > 0 needs the discriminator's logits")
        out["local"] = local_weight * patch_gan_loss(disc_logits, real=True)
    if balance_weight:
        out["balance"] = balance_weight * class_balance(teacher_logits if balance_logits is None else balance_logits)
    return out

