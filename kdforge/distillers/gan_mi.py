"""The other mutual-information add-ons of VEM's Table 4 ablation, on top of the generator-KD baseline (`gan_kd`):

  gan_vid  VID (Ahn et al. 2019) on images: the reference image r (the teacher's, or the real target, `mi_target`)
           is modelled as N(mu(s), sigma^2) with mu a small conv net on the student image s and one learned
           variance per pixel (C, H, W); loss mi_weight * Gaussian NLL (kdforge.losses.vem.vid_pixel_nll).
  gan_crd  CRD (Tian et al. 2020) on images: patches of s and of r on a regular grid are embedded by one shared
           head (linear on the flattened patch, ReLU, linear, as CUT's MLP head); InfoNCE makes each student patch
           pick the reference patch at the same place among the batch's (kdforge.losses.vem.patch_nce).
Their heads train with the student's optimiser. The paper found both help less than VEM (Horse -> Zebra FID with
OMGD: 57.14 baseline, 65.73 + VID, 70.59 + CRD, 50.83 + VEM; lower is better).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.gan_kd import GeneratorKD
from kdforge.distillers.vem import check_mi_target, mi_reference
from kdforge.engine import distributed
from kdforge.losses.vem import NEGATIVES, image_patches, patch_nce, vid_pixel_nll
from kdforge.registry import DISTILLERS


class _MIAddOn(GeneratorKD):
    student_side = (*GeneratorKD.student_side, "mi_head")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mi_weight: float, mi_target: str,
                 **baseline: Any) -> None:
        super().__init__(student, teacher, mi_weight=mi_weight, **baseline)
        self.mi_target = check_mi_target(self.method, mi_target)

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the generated images, from one eval-mode pass of the teacher (no RNG, no statistics)."""
        was = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                return tuple(self.teacher(torch.zeros(1, *self.input_shape)).shape[1:])
        finally:
            self.teacher.train(was)

    def mi_reference(self, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        return mi_reference(self.mi_target, t, batch)


@DISTILLERS.register("gan_vid")
class GeneratorVID(_MIAddOn):
    method = "gan_vid"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mi_weight: float = 1.0, mi_target: str = "auto",
                 hidden: int = 32, init_var: float = 1.0, eps: float = 1e-5, **baseline: Any) -> None:
        super().__init__(student, teacher, mi_weight=mi_weight, mi_target=mi_target, **baseline)
        c, h, w = self.image_shape()
        mean = nn.Sequential(nn.Conv2d(c, hidden, 3, 1, 1), nn.ReLU(), nn.Conv2d(hidden, c, 3, 1, 1))
        # softplus(log_scale) + eps == init_var at the start
        log_scale = nn.Parameter(torch.full((c, h, w), math.log(math.expm1(init_var - eps))))
        self.mi_head = nn.ModuleDict({"mean": mean})
        self.mi_head.register_parameter("log_scale", log_scale)
        self.eps = eps

    def mi_term(self, reference, s, x, batch):
        mu = s + self.mi_head["mean"](s)  # residual: the mean starts at the student image itself
        return vid_pixel_nll(mu, reference, self.mi_head.log_scale, self.eps), {}


@DISTILLERS.register("gan_crd")
class GeneratorCRD(_MIAddOn):
    method = "gan_crd"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mi_weight: float = 1.0, mi_target: str = "auto",
                 patch_size: int = 4, embed_dim: int = 128, nce_temperature: float = 0.07, negatives: str = "all",
                 **baseline: Any) -> None:
        super().__init__(student, teacher, mi_weight=mi_weight, mi_target=mi_target, **baseline)
        if negatives not in NEGATIVES:
            raise ValueError(f"gan_crd: negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        c = self.image_shape()[0]
        d_in = c * patch_size * patch_size
        self.mi_head = nn.Sequential(nn.Linear(d_in, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))
        self.patch_size, self.nce_temperature, self.negatives = patch_size, nce_temperature, negatives

    def mi_term(self, reference, s, x, batch):
        z_s = self.mi_head(image_patches(s, self.patch_size))
        with torch.no_grad():
            z_r = self.mi_head(image_patches(reference, self.patch_size))
        if self.negatives != "image":  # negatives from other images: the global batch's (gathered over ranks)
            z_s, z_r = distributed.gather_batch(z_s, z_r)
        return patch_nce(z_s, z_r, temperature=self.nce_temperature, negatives=self.negatives), {}
