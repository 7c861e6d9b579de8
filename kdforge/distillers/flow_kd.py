"""Flow distillation, Algorithm 1 of "Defender of privacy and fairness: tiny but reversible generative model via
mutually collaborative knowledge distillation" (appendix A.1): a Glow teacher's encoder and decoder, each replaced by
a fast CNN student (kdforge/models/flow_students.py), one stage each, the other network of the pair frozen.

The student is one module with `encoder` and `decoder` attributes (`flow_student`), both speaking the teacher's
latent layout. Latents are the flow's standardized ones by default (`latent: standardized`: eps_l = (z_l - mu_l) /
sigma_l, N(0, I) under the teacher, what anonymisation rotates; `raw` for z_l itself). Images are the teacher's
input space, [-0.5, 0.5]: the loader gives [0, 1] (data.mean = 0, data.std = 1) and the teacher's `preprocess`
(the teacher is always in eval mode: bin centres, no noise) maps them.

  stage "decoder" (first, `decoder_share` of the epochs; student.encoder frozen):
      decoder_data "images" (Algorithm 1): x' = D_s(E_t(x)) against the image x;
      decoder_data "samples" (Baranchuk et al. 2021): eps ~ N(0, T^2 I), x' = D_s(eps) against x = D_t(eps), no data;
      the sum of the decoder terms below, each with its own weight (0 turns it off)
  stage "encoder" (the rest; student.decoder frozen):
      eps ~ N(0, T^2 I) (T = `sample_temperature`), x_t = D_t(eps), z' = E_s(x_t);
      latent_weight * mean (z' - z)^2, z = eps (standardized) or the teacher's raw z for x_t;
      samples the teacher decodes to non-finite or far out-of-range images are dropped (`prior_images`)

`distil: decoder` (or `encoder`) runs that stage alone for all the epochs, the other student left as built: the
decoder-loss baselines differ only in stage "decoder", so a table can distil the encoder once and pair it with each
baseline's decoder (benchmarks/flow_table.py).

Decoder terms (x' against x, images in [-0.5, 0.5]; per-pixel means):
  l1_weight       mean |x' - x|                         Algorithm 1's pixel term
  mse_weight      mean (x' - x)^2                       the "MSE" baseline
  ssim_weight     1 - SSIM(x', x) (data range 1)        the default stand-in for the paper's LPIPS
  lpips_weight    LPIPS(x', x), torchmetrics' heads on a local backbone file (`lpips: {net, backbone_weights}`),
                  the paper's term when a user has ImageNet weights (kdforge.losses.image.lpips_network)
  feature_weight  sum over layers of mean |F(x') - F(x)|, F a frozen `feature_net` with local weights
  style_weight    Gram-matrix L1 over F's layers (OMGD's style term)
  tv_weight       total variation of x', summed over each image, averaged over the batch (OMGD: 1e-5)
  wavelet_weight  mean |high Haar bands of x' - of x| over `wavelet_levels` levels (WKD)
The paper's perceptual term (its lambda) is whichever of ssim / lpips / feature a recipe weighs: named in every table.

The appendix prints lambda = gamma = 1e4 with "||gamma z - z'||^2". Read literally, the student encoder would learn
gamma times the teacher's latent, which no decoder expects, so kdforge weighs the error instead (gamma ||z - z'||^2,
`encoder_loss: weighted`); `encoder_loss: as_printed` keeps the literal form for measuring. With per-pixel means
(kdforge's) the 1e4 weights would drown the L1 term, so the defaults are 1; the printed scale matches sums over the
12,288 numbers of a 64 px image.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller, Stage
from kdforge.distillers.flow_mle import check_flow
from kdforge.engine import distributed
from kdforge.losses.image import lpips_network, wavelet_loss
from kdforge.losses.vem import ssim, style_loss, total_variation
from kdforge.models.feature_net import build_feature_net
from kdforge.models.flow_layout import flatten_latents
from kdforge.registry import DISTILLERS

ENCODER_LOSSES = ("weighted", "as_printed")
LATENTS = ("standardized", "raw")
DECODER_DATA = ("images", "samples")
DISTIL = ("both", "decoder", "encoder")


@DISTILLERS.register("flow_kd")
class FlowKD(Distiller):
    model_kind = "flow"
    predict_scores_teacher = True  # recon_teacher: the flow's own round trip, beside the students' pairings

    def __init__(self, student: nn.Module, teacher: nn.Module, *, l1_weight: float = 1.0, mse_weight: float = 0.0,
                 ssim_weight: float = 1.0, lpips_weight: float = 0.0, lpips: dict[str, Any] | None = None,
                 feature_weight: float = 0.0, style_weight: float = 0.0,
                 feature_net: dict[str, Any] | nn.Module | None = None, tv_weight: float = 0.0,
                 wavelet_weight: float = 0.0, wavelet_levels: int = 3, latent_weight: float = 1.0,
                 encoder_loss: str = "weighted", latent: str = "standardized", decoder_data: str = "images",
                 sample_temperature: float = 1.0, sample_bound: float | None = None,
                 decoder_share: float = 0.5, distil: str = "both") -> None:
        super().__init__(student, teacher)
        check_flow(teacher, "teacher")
        if not (hasattr(student, "encoder") and hasattr(student, "decoder")):
            raise TypeError(f"flow_kd: the student ({type(student).__name__}) needs `encoder` and `decoder` "
                            "attributes (`flow_student` has them)")
        for name, value, allowed in (("encoder_loss", encoder_loss, ENCODER_LOSSES), ("latent", latent, LATENTS),
                                     ("decoder_data", decoder_data, DECODER_DATA), ("distil", distil, DISTIL)):
            if value not in allowed:
                raise ValueError(f"flow_kd: {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.weights = {"l1": l1_weight, "mse": mse_weight, "ssim": ssim_weight, "lpips": lpips_weight,
                        "feature": feature_weight, "style": style_weight, "tv": tv_weight, "wavelet": wavelet_weight}
        if min(*self.weights.values(), latent_weight) < 0 or not 0 < decoder_share < 1:
            raise ValueError("flow_kd: weights must be >= 0 and decoder_share in (0, 1)")
        if not any(self.weights.values()):
            raise ValueError("flow_kd: every decoder term has weight 0: the decoder stage would learn nothing")
        self.feature_net = self.lpips = None
        if feature_weight or style_weight:
            if feature_net is None:
                raise ValueError("flow_kd: feature_weight / style_weight need feature_net: {name, weights, layers}")
            # the flow's images are in [-0.5, 0.5]: x + 0.5 is the [0, 1] image the network's statistics expect
            self.feature_net = build_feature_net(feature_net, image_mean=(0.5,) * 3, image_std=(1.0,) * 3,
                                                 role="flow_kd.feature_net")
        if lpips_weight:
            self.lpips = lpips_network(**(lpips or {}))
        self.latent_weight, self.wavelet_levels = float(latent_weight), int(wavelet_levels)
        self.encoder_loss, self.standardized = encoder_loss, latent == "standardized"
        self.decoder_data, self.distil = decoder_data, distil
        self.sample_temperature, self.decoder_share = float(sample_temperature), float(decoder_share)
        self.sample_bound = math.inf if sample_bound is None else float(sample_bound)  # inf: drop non-finite only

    # ------------------------------------------------------------------ stages and networks
    def stages(self, total_epochs: int) -> list[Stage]:
        if self.distil != "both":  # one student alone, e.g. decoder-loss baselines sharing one distilled encoder
            other = "encoder" if self.distil == "decoder" else "decoder"
            return [Stage(self.distil, total_epochs, frozen=(f"student.{other}",))]
        if total_epochs < 2:
            raise ValueError(f"flow_kd: Algorithm 1 has two stages (decoder, then encoder): train.epochs must be >= 2, "
                             f"got {total_epochs}")
        decoder = min(total_epochs - 1, max(1, round(total_epochs * self.decoder_share)))
        return [Stage("decoder", decoder, frozen=("student.encoder",)),
                Stage("encoder", total_epochs - decoder, frozen=("student.decoder",))]

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "encoder": self.student.encoder, "decoder": self.student.decoder}

    def unsaved_modules(self) -> tuple[str, ...]:
        return ("teacher", "feature_net", "lpips")

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
        if self.stage == "encoder":
            return self.encoder_terms(x.shape[0], x.device)
        if self.decoder_data == "samples":
            eps, x_t = self.prior_images(x.shape[0], x.device)
            return self.decoder_terms(self.student.decoder(eps), x_t)
        return self.decoder_terms(self.student.decoder(self.teacher_encode(x)), x)

    def prior_images(self, n: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """eps ~ N(0, T^2 I) and the teacher's images D_t(eps), keeping the samples it decodes to finite images (and,
        with `sample_bound` b, within [-b, b]): a Glow's inverse overflows on a few draws of its own prior (a face
        Glow after 4 epochs, T = 1: NaN in 2 of 5 batches of 64), and one NaN sample would poison the whole step."""
        t = self.sample_temperature
        eps = [distributed.randn(n, *shape, device=device) * t for shape in self.teacher.latent_shapes]
        x_t = self.teacher_decode(eps)
        flat = x_t.flatten(1)
        ok = torch.isfinite(flat).all(1) & (torch.nan_to_num(flat).abs().amax(1) <= self.sample_bound)
        if not ok.any():
            raise FloatingPointError(f"flow_kd: the teacher decoded none of {n} prior samples (T = "
                                     f"{self.sample_temperature}) to a finite image within +-{self.sample_bound}: "
                                     "lower method.sample_temperature")
        return [e[ok] for e in eps], x_t[ok]

    def decoder_terms(self, recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w, out = self.weights, {}
        if w["l1"]:
            out["l1"] = w["l1"] * F.l1_loss(recon, x)
        if w["mse"]:
            out["mse"] = w["mse"] * F.mse_loss(recon, x)
        if w["ssim"]:
            out["ssim"] = w["ssim"] * (1 - ssim(recon, x, data_range=1.0))
        if w["lpips"]:
            out["lpips"] = w["lpips"] * self.lpips(2 * recon, 2 * x).mean()  # LPIPS takes [-1, 1]
        if w["feature"] or w["style"]:
            fs, ft = self.feature_net(recon), [f.detach() for f in self.feature_net(x)]
            if w["feature"]:
                out["feature"] = w["feature"] * sum(F.l1_loss(a, b) for a, b in zip(fs, ft))
            if w["style"]:
                out["style"] = w["style"] * style_loss(fs, ft)
        if w["tv"]:
            out["tv"] = w["tv"] * total_variation(recon, reduction="mean")
        if w["wavelet"]:
            out["wavelet"] = w["wavelet"] * wavelet_loss(recon, x, self.wavelet_levels)
        return out

    def encoder_terms(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        eps, x_t = self.prior_images(n, device)
        z = eps if self.standardized else self.teacher_encode(x_t)
        z_s, z_t = flatten_latents(self.student.encoder(x_t)), flatten_latents(z)
        if self.encoder_loss == "weighted":
            return {"latent": self.latent_weight * F.mse_loss(z_s, z_t)}
        return {"latent": F.mse_loss(z_s, self.latent_weight * z_t)}  # ||gamma z - z'||^2, as printed

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
