"""Flow distillation, Algorithm 1 of "Defender of privacy and fairness: tiny but reversible generative model via
mutually collaborative knowledge distillation" (appendix A.1): a Glow teacher's encoder and decoder, each replaced by
a fast CNN student (kdforge/models/flow_students.py), one stage each, the other network of the pair frozen.

The student is one module with `encoder` and `decoder` attributes (`flow_student`), both speaking the teacher's
latent layout. Latents are the flow's standardized ones by default (`latent: standardized`: eps_l = (z_l - mu_l) /
sigma_l, N(0, I) under the teacher, what anonymisation rotates; `raw` for z_l itself). Images are the teacher's
input space, [-0.5, 0.5]: the loader gives [0, 1] (data.mean = 0, data.std = 1) and the teacher's `preprocess`
(the teacher is always in eval mode: bin centres, no noise) maps them.

  stage "decoder" (first, `decoder_share` of the epochs; student.encoder frozen):
      x' = D_s(E_t(x));   l1_weight * mean|x' - x|  +  perceptual_weight * P(x', x)
  stage "encoder" (the rest; student.decoder frozen):
      eps ~ N(0, T^2 I) (T = `sample_temperature`), x_t = D_t(eps), z' = E_s(x_t);
      latent_weight * mean (z' - z)^2, z = eps (standardized) or the teacher's raw z for x_t

P, the perceptual term: the paper's LPIPS needs ImageNet weights that cannot be downloaded here, so it is a named
substitute: "ssim" (1 - SSIM, kdforge.losses.vem.ssim, data range 1), or "features" (mean |F(x') - F(x)| over the
layers of a frozen network given in `feature_net` with local weights, e.g. one kdforge trained), or "none".

The appendix prints lambda = gamma = 1e4 with "||gamma z - z'||^2". Read literally, the student encoder would learn
gamma times the teacher's latent, which no decoder expects, so kdforge weighs the error instead (gamma ||z - z'||^2,
`encoder_loss: weighted`); `encoder_loss: as_printed` keeps the literal form for measuring. With per-pixel means
(kdforge's) the 1e4 weights would drown the L1 term, so the defaults are 1; the printed scale matches sums over the
12,288 numbers of a 64 px image.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller, Stage
from kdforge.distillers.flow_mle import check_flow
from kdforge.losses.vem import ssim
from kdforge.models.feature_net import build_feature_net
from kdforge.models.flow_layout import flatten_latents
from kdforge.registry import DISTILLERS

PERCEPTUAL = ("ssim", "features", "none")
ENCODER_LOSSES = ("weighted", "as_printed")


@DISTILLERS.register("flow_kd")
class FlowKD(Distiller):
    model_kind = "flow"
    predict_scores_teacher = True  # recon_teacher: the flow's own round trip, beside the students' pairings

    def __init__(self, student: nn.Module, teacher: nn.Module, *, l1_weight: float = 1.0,
                 perceptual_weight: float = 1.0, perceptual: str = "ssim",
                 feature_net: dict[str, Any] | nn.Module | None = None, latent_weight: float = 1.0,
                 encoder_loss: str = "weighted", latent: str = "standardized", sample_temperature: float = 1.0,
                 decoder_share: float = 0.5) -> None:
        super().__init__(student, teacher)
        check_flow(teacher, "teacher")
        if not (hasattr(student, "encoder") and hasattr(student, "decoder")):
            raise TypeError(f"flow_kd: the student ({type(student).__name__}) needs `encoder` and `decoder` "
                            "attributes (`flow_student` has them)")
        for name, value, allowed in (("perceptual", perceptual, PERCEPTUAL), ("encoder_loss", encoder_loss,
                                     ENCODER_LOSSES), ("latent", latent, ("standardized", "raw"))):
            if value not in allowed:
                raise ValueError(f"flow_kd: {name} must be one of {', '.join(allowed)}, got {value!r}")
        if min(l1_weight, perceptual_weight, latent_weight) < 0 or not 0 < decoder_share < 1:
            raise ValueError("flow_kd: weights must be >= 0 and decoder_share in (0, 1)")
        self.feature_net = None
        if perceptual == "features":
            if feature_net is None:
                raise ValueError("flow_kd: perceptual 'features' needs feature_net: {name, weights, layers}")
            # the flow's images are in [-0.5, 0.5]: x + 0.5 is the [0, 1] image the network's statistics expect
            self.feature_net = build_feature_net(feature_net, image_mean=(0.5,) * 3, image_std=(1.0,) * 3,
                                                 role="flow_kd.feature_net")
        self.weights = {"l1": l1_weight, "perceptual": perceptual_weight if perceptual != "none" else 0.0,
                        "latent": latent_weight}
        self.perceptual, self.encoder_loss, self.standardized = perceptual, encoder_loss, latent == "standardized"
        self.sample_temperature, self.decoder_share = float(sample_temperature), float(decoder_share)

    # ------------------------------------------------------------------ stages and networks
    def stages(self, total_epochs: int) -> list[Stage]:
        if total_epochs < 2:
            raise ValueError(f"flow_kd: Algorithm 1 has two stages (decoder, then encoder): train.epochs must be >= 2, "
                             f"got {total_epochs}")
        decoder = min(total_epochs - 1, max(1, round(total_epochs * self.decoder_share)))
        return [Stage("decoder", decoder, frozen=("student.encoder",)),
                Stage("encoder", total_epochs - decoder, frozen=("student.decoder",))]

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "encoder": self.student.encoder, "decoder": self.student.decoder}

    def unsaved_modules(self) -> tuple[str, ...]:
        return ("teacher", "feature_net")

    # ------------------------------------------------------------------ the teacher, both ways
    def teacher_encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.teacher.encode(x, standardized=True) if self.standardized else self.teacher.encode(x)

    def teacher_decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher.decode(latents, standardized=self.standardized)

    # ------------------------------------------------------------------ Algorithm 1
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.teacher.preprocess(batch["image"])
        if self.stage == "decoder":
            return self.decoder_terms(self.student.decoder(self.teacher_encode(x)), x)
        return self.encoder_terms(x.shape[0], x.device)

    def decoder_terms(self, recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w, out = self.weights, {}
        if w["l1"]:
            out["l1"] = w["l1"] * F.l1_loss(recon, x)
        if w["perceptual"]:
            if self.perceptual == "ssim":
                p = 1 - ssim(recon, x, data_range=1.0)
            else:
                p = sum(F.l1_loss(a, b.detach()) for a, b in zip(self.feature_net(recon), self.feature_net(x)))
            out["perceptual"] = w["perceptual"] * p
        return out

    def encoder_terms(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        eps = [torch.randn(n, *shape, device=device) * self.sample_temperature for shape in self.teacher.latent_shapes]
        x_t = self.teacher_decode(eps)
        z = eps if self.standardized else self.teacher_encode(x_t)
        z_s, z_t = flatten_latents(self.student.encoder(x_t)), flatten_latents(z)
        if self.encoder_loss == "weighted":
            return {"latent": self.weights["latent"] * F.mse_loss(z_s, z_t)}
        return {"latent": F.mse_loss(z_s, self.weights["latent"] * z_t)}  # ||gamma z - z'||^2, as printed

    # ------------------------------------------------------------------ what is scored
    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every encoder/decoder pairing's reconstruction of the batch (the "flow" evaluator scores each)."""
        x = self.teacher.preprocess(batch["image"])
        z_t, z_s = self.teacher_encode(x), self.student.encoder(x)
        return {"input": x, "recon_teacher": self.teacher_decode(z_t), "recon_student": self.student.decoder(z_s),
                "recon_t_enc_s_dec": self.student.decoder(z_t), "recon_s_enc_t_dec": self.teacher_decode(z_s)}

    @torch.no_grad()
    def teacher_predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.teacher.preprocess(batch["image"])
        return {"input": x, "recon_teacher": self.teacher_decode(self.teacher_encode(x))}
