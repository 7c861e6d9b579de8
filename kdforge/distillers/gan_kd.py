"""Generator distillation, OMGD-style (Ren et al., ICCV 2021): the baseline "algorithm-specific loss" of VEM's Eq. 10,
and the base of its mutual-information add-ons (gan_vid, gan_crd, vem).

A slim student generator learns to reproduce a trained teacher generator on the same inputs (edge maps for an
image-to-image generator, codes z for an unconditional one; see kdforge.distillers.gan_base). The student's loss,
each term weighted by the option named after it (0 leaves it out):

    l1 * mean|s - t| + ssim * (1 - SSIM(s, t))                 output mimicry (OMGD: ssim 10, no L1)
  + feature * sum_l MSE(GAP(A_l(s_l)), GAP(t_l))              intermediate features through 1x1-conv adapters A_l
                                                              (OMGD's channel distillation; `feature_pool` false:
                                                              whole maps, FitNets)
  + perceptual * sum_l mean|F_l(s) - F_l(t)|                  a frozen feature network F named in `feature_net`
  + style * sum_l mean|Gram F_l(s) - Gram F_l(t)|             (OMGD: VGG16, weights 10 and 1e4; here any network
                                                              with local weights, named in the report)
  + tv * TV(s)                                                total variation, summed (OMGD: 1e-5)
  + target * mean|s - y|                                      paired data: the real target too (pix2pix's L1)
  + gan * GAN(D(s))                                           against a discriminator D trained on real vs fake
  + mi * the add-on's mutual-information term (`mi_term`: VID, CRD or VEM)

Optimisers, all stepped inside `training_step` in the paper's order (Sec. 3): the add-on's own ("energy" for VEM),
then "student" (the recipe's optimiser and schedule; adapters and the add-on's heads train with it), then
"discriminator" (with gan > 0 or an online teacher), then "teacher" (online_teacher: it keeps training with its own
GAN loss, pix2pix's + 100 L1 on paired data; the discriminator then judges the teacher's images, as OMGD's).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.distillers.feature_base import check_weights
from kdforge.distillers.gan_base import generator_input, network, real_images, z_dim_of
from kdforge.distillers.pix2pix import to_unit
from kdforge.engine import distributed
from kdforge.engine.optim import build_optimizer
from kdforge.losses.gan import check_gan_loss, discriminator_loss, generator_loss
from kdforge.losses.vem import feature_mimic_loss, ssim, style_loss, total_variation
from kdforge.models.feature_net import build_feature_net
from kdforge.models.state import keep_running_stats, no_weight_grads
from kdforge.registry import DISTILLERS


def adapter(c_in: int, c_out: int) -> nn.Module:
    """OMGD's channel adapter: 1x1 conv (no bias) + BN + ReLU, He-initialised."""
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())


@DISTILLERS.register("gan_kd")
class GeneratorKD(Distiller):
    main_optimizer = None  # student, add-on, discriminator and teacher are stepped inside training_step
    model_kind = "generator"
    method = "gan_kd"
    student_side = ("student", "adapters")  # modules the "student" optimiser trains (add-ons append their heads)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, input_shape: tuple[int, ...] | None = None,
                 l1_weight: float = 0.0, ssim_weight: float = 10.0, tv_weight: float = 1e-5,
                 feature_weight: float = 0.0, student_layers: Sequence[str] = (), teacher_layers: Sequence[str] = (),
                 feature_pool: bool = True, perceptual_weight: float = 0.0, style_weight: float = 0.0,
                 feature_net: dict[str, Any] | nn.Module | None = None, target_weight: float = 0.0,
                 gan_weight: float = 0.0, gan_loss: str = "hinge", discriminator: str | nn.Module | None = None,
                 discriminator_options: dict[str, Any] | None = None, discriminator_lr: float = 2e-4,
                 online_teacher: bool = False, teacher_lr: float = 2e-4, teacher_l1_weight: float = 100.0,
                 mi_weight: float = 0.0, data_range: float = 2.0, snapshot_size: int = 8) -> None:
        if isinstance(student_layers, str):
            student_layers = [student_layers]
        if isinstance(teacher_layers, str):
            teacher_layers = [teacher_layers]
        if len(student_layers) != len(teacher_layers) or (feature_weight and not student_layers):
            raise ValueError(f"{self.method}: student_layers {list(student_layers)} and teacher_layers "
                             f"{list(teacher_layers)} must pair up one to one (and be given when feature_weight > 0)")
        self.student_features, self.teacher_features = tuple(student_layers), tuple(teacher_layers)
        super().__init__(student, teacher)
        self.weights = dict(l1=l1_weight, ssim=ssim_weight, tv=tv_weight, feature=feature_weight,
                            perceptual=perceptual_weight, style=style_weight, target=target_weight, gan=gan_weight,
                            mi=mi_weight)
        check_weights(self.method, **{f"{k}_weight": v for k, v in self.weights.items()})
        if mi_weight and type(self).mi_term is GeneratorKD.mi_term:
            raise ValueError(f"{self.method}: mi_weight={mi_weight} but this method has no mutual-information term "
                             "(use gan_vid, gan_crd or vem)")
        check_gan_loss(self.method, gan_loss)
        self.z_dim = z_dim_of(student)
        if self.z_dim != z_dim_of(teacher):
            raise ValueError(f"{self.method}: student takes {self._kind(self.z_dim)} but teacher takes "
                             f"{self._kind(z_dim_of(teacher))}; they must take the same input")
        if self.z_dim is None and not input_shape:
            raise ValueError(f"{self.method}: an image-to-image generator needs input_shape (C, H, W) of its input")
        self.input_shape = (self.z_dim,) if self.z_dim is not None else tuple(input_shape)
        self.gan_loss, self.data_range = gan_loss, float(data_range)
        self.feature_pool = bool(feature_pool)
        self.adapters = nn.ModuleList()
        if feature_weight:
            s_shapes, t_shapes = self.feature_shapes(self.input_shape)
            self.adapters.extend(adapter(s[1], t[1]) for s, t in zip(s_shapes, t_shapes))
        self.feature_net = None
        if perceptual_weight or style_weight:
            if feature_net is None:
                raise ValueError(f"{self.method}: perceptual_weight / style_weight need feature_net: {{name, weights, "
                                 "layers}} (a frozen network with local weights; ImageNet ones cannot be downloaded)")
            self.feature_net = build_feature_net(feature_net, role=f"{self.method}.feature_net")
        self.online_teacher = bool(online_teacher)
        if self.online_teacher:
            teacher.requires_grad_(True)
        self.discriminator = None
        if gan_weight or self.online_teacher:
            self.discriminator = self._build_discriminator(discriminator, discriminator_options or {})
        self.discriminator_lr, self.teacher_lr = float(discriminator_lr), float(teacher_lr)
        self.teacher_l1_weight = float(teacher_l1_weight)
        # the snapshot's fixed inputs: codes drawn once from their own seed, or (image-to-image) the first training
        # batch's first images and targets, kept in buffers so checkpoints hold them; counts: (inputs, targets)
        if self.z_dim is not None:
            codes = torch.randn(snapshot_size, self.z_dim, generator=torch.Generator().manual_seed(0))
            self.register_buffer("snapshot_input", codes)
            self.register_buffer("snapshot_target", torch.zeros(0))
            self.register_buffer("snapshot_count", torch.tensor([snapshot_size, 0]))
        else:
            self.register_buffer("snapshot_input", torch.zeros(snapshot_size, *self.input_shape))
            self.register_buffer("snapshot_target", torch.zeros(snapshot_size, *self.input_shape))
            self.register_buffer("snapshot_count", torch.tensor([0, 0]))

    @staticmethod
    def _kind(z_dim: int | None) -> str:
        return f"codes of {z_dim}" if z_dim is not None else "images"

    def _build_discriminator(self, spec: str | nn.Module | None, options: dict[str, Any]) -> nn.Module:
        size = self.input_shape[-1] if self.z_dim is None else getattr(self.student, "img_size", 32)
        name = spec or ("sn_discriminator" if self.z_dim is not None else "patchgan_discriminator")
        return network(name, options, {"img_size": size}, method=self.method, role="discriminator")

    # ------------------------------------------------------------------ contract
    def train(self, mode: bool = True) -> GeneratorKD:
        super().train(mode)
        if self.teacher is not None and self.online_teacher and mode:
            self.teacher.train()  # an online teacher keeps training (the base class keeps teachers in eval)
        return self

    def networks(self) -> dict[str, nn.Module]:
        nets = {"student": self.student}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        if self.online_teacher:
            nets["teacher"] = self.teacher
        return nets

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, Any]:
        params = [p for name in self.student_side for p in getattr(self, name).parameters() if p.requires_grad]
        opts: dict[str, Any] = {"student": build_optimizer(params, cfg)}
        if self.discriminator is not None:
            opts["discriminator"] = torch.optim.Adam(self.discriminator.parameters(), lr=self.discriminator_lr,
                                                     betas=(0.5, 0.999))
        if self.online_teacher:
            opts["teacher"] = torch.optim.Adam(self.teacher.parameters(), lr=self.teacher_lr, betas=(0.5, 0.999))
        return opts

    def unsaved_modules(self) -> tuple[str, ...]:
        """A frozen feature network is never saved; an online teacher trains, so it is."""
        return ("feature_net",) + (() if self.online_teacher else ("teacher",))

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.student(generator_input(self.student, batch, train=False))

    @torch.no_grad()
    def teacher_predict(self, batch: Batch) -> torch.Tensor:
        return self.teacher(generator_input(self.teacher, batch, train=False))

    # ------------------------------------------------------------------ the step
    def mi_term(self, reference: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
                batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The add-on's mutual-information loss (unweighted, with grad to the student side; logged as "mi" times
        mi_weight) and values to log (detached); `reference` is the teacher's image or the real target."""
        raise NotImplementedError(f"{type(self).__name__} has no mutual-information term; set mi_weight: 0")

    def mi_reference(self, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        return t

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = generator_input(self.student, batch, train=True)
        self._remember_snapshot(x, batch)
        t, t_feats = self._teacher_images(batch, x)
        s, s_feats = self.run_student(x)
        s = s.float()
        logged: dict[str, torch.Tensor] = {}
        terms = self.student_terms(s, t, s_feats, t_feats, batch, x)
        if self.weights["mi"]:
            mi, logged = self.mi_term(self.mi_reference(t, batch), s, x, batch)
            terms["mi"] = self.weights["mi"] * mi
        out = {k: v.detach() for k, v in terms.items()}
        out["student"] = self.optimizer_step("student", sum(terms.values()))
        out.update(logged)
        if self.discriminator is not None:
            out.update(self._discriminator_and_teacher(batch, x, s.detach()))
        return out

    def _teacher_images(self, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's images and tapped features for `x` (from the teacher cache when it is on and x is the batch's
        own image); an online teacher's are a fixed reference here, its own graph is built in its step."""
        if self.online_teacher:
            with torch.no_grad(), keep_running_stats(self.teacher):
                out = self.teacher(x)
            feats = self._t_taps.take() if self._t_taps else []
        else:
            out, feats = self.run_teacher(batch, x)
        return out.detach().float(), [f.detach() for f in feats]

    def student_terms(self, s: torch.Tensor, t: torch.Tensor, s_feats: list[torch.Tensor],
                      t_feats: list[torch.Tensor], batch: Batch, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w, out = self.weights, {}
        if w["l1"]:
            out["l1"] = w["l1"] * F.l1_loss(s, t)
        if w["ssim"]:
            out["ssim"] = w["ssim"] * (1 - ssim(s, t, data_range=self.data_range))
        if w["feature"]:
            mapped = [a(f) for a, f in zip(self.adapters, s_feats)]
            out["feature"] = w["feature"] * feature_mimic_loss(mapped, [f.float() for f in t_feats],
                                                               pool=self.feature_pool)
        if self.feature_net is not None:
            fs, ft = self.feature_net(s), [f.detach() for f in self.feature_net(t)]
            if w["perceptual"]:
                out["perceptual"] = w["perceptual"] * sum(F.l1_loss(a, b) for a, b in zip(fs, ft))
            if w["style"]:
                out["style"] = w["style"] * style_loss(fs, ft)
        if w["tv"]:
            # summed over the global batch: each rank's sum counts once per rank (gradients are averaged)
            out["tv"] = w["tv"] * total_variation(s) * distributed.current().world_size
        if w["target"]:
            out["target"] = w["target"] * F.l1_loss(s, real_images(batch).float())
        if w["gan"]:
            with no_weight_grads(self.discriminator), keep_running_stats(self.discriminator):
                logits = self._judge(s, x)
            out["gan"] = w["gan"] * generator_loss(logits, self.gan_loss)
        return out

    def _judge(self, images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """D's logits; a conditional (paired) discriminator also sees the input image."""
        return self.discriminator(images) if self.z_dim is not None else self.discriminator(images, x)

    def _discriminator_and_teacher(self, batch: Batch, x: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """D learns real vs the images it must judge (the online teacher's, else the student's); then the online
        teacher takes its own GAN step (+ teacher_l1_weight * L1 to the target on paired data)."""
        real = real_images(batch).float()
        fake = None
        if self.online_teacher:
            fake = self.teacher(x).float()
        judged = (fake if fake is not None else s).detach()
        loss_d = discriminator_loss(self._judge(real, x), self._judge(judged, x), self.gan_loss)
        out = {"disc": self.optimizer_step("discriminator", loss_d)}
        if fake is not None:
            with no_weight_grads(self.discriminator), keep_running_stats(self.discriminator):
                loss_t = generator_loss(self._judge(fake, x), self.gan_loss)
            if self.z_dim is None and self.teacher_l1_weight:
                loss_t = loss_t + self.teacher_l1_weight * F.l1_loss(fake, real)
            out["teacher"] = self.optimizer_step("teacher", loss_t)
        return out

    # ------------------------------------------------------------------ snapshots
    @torch.no_grad()
    def _remember_snapshot(self, x: torch.Tensor, batch: Batch) -> None:
        """Image-to-image: the first training batch's first inputs (and targets) become the fixed snapshot."""
        if self.z_dim is None and int(self.snapshot_count[0]) == 0:
            x, *target = distributed.gather_batch(x, *([batch["target"]] if "target" in batch else []))
            if target:  # the global batch's first samples, whichever rank holds them
                batch = {**batch, "target": target[0]}
            n = min(len(x), len(self.snapshot_input))
            self.snapshot_input[:n].copy_(x[:n])
            self.snapshot_count[0] = n
            if "target" in batch and batch["target"].shape[1:] == self.snapshot_target.shape[1:]:
                self.snapshot_target[:n].copy_(batch["target"][:n])
                self.snapshot_count[1] = n

    @torch.no_grad()
    def epoch_snapshot(self) -> dict[str, Any]:
        """Rows input | teacher | student | target (images mapped from [-1, 1] to [0, 1])."""
        n, n_target = (int(c) for c in self.snapshot_count)
        if n == 0:
            return {}
        x = self.snapshot_input[:n]
        rows = [self.teacher(x), self.student(x)]
        if self.z_dim is None:
            rows.insert(0, x)
            if n_target:
                rows.append(self.snapshot_target[:n_target])
        return {"samples": torch.cat([to_unit(r) for r in rows]).cpu()}
