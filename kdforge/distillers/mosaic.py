"""MosaicKD (Fang et al., NeurIPS 2021, "Mosaicking to Distill: Knowledge Distillation from Out-of-Domain Data").

No in-domain training data: the train loader yields unlabelled out-of-domain (OOD) images. A generator G learns
to compose OOD-like patches into images the teacher finds in-domain, a patch discriminator D keeps them locally
real, and the student is distilled on them and on the real OOD images, in a min-max game where G seeks samples on
which teacher and student disagree. Each training step (one OOD batch, split into `student_steps` chunks):
  1. D:  local_weight * (BCE(D(real chunk 0), 1) + BCE(D(G(z)), 0)) / 2, G(z) detached   [skipped if local_weight 0]
  2. G:  on the same G(z): adv * -KL(t || s) (at T = 1, whatever `temperature`, as the official code)
         + align * H(t) + local * BCE(D(G(z)), 1) + balance * sum p log2 p
  3. student, `student_steps` times: fresh z, G(z) without grad, concatenated with the next real chunk;
     loss T^2 KL(teacher || student) at `temperature` (Hinton KD, the official code's direction).
Three optimisers: "generator" and "discriminator" Adam(generator_lr, (0.5, 0.999)) with `generator_schedule`
(cosine, as the official code), "student" from the recipe (SGD 0.1 there). Generator, normalisation and epoch
snapshots come from kdforge.distillers.generator_base, shared with DAFL and DFAD. The OOD batch is split
rather than read `student_steps` more times per step (as the official loop does), so an epoch is one pass over
the OOD set and resume stays exact; give the loader `student_steps` x the per-step real batch (the official
5 x 256 = 1280).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from kdforge.distillers.base import Batch
from kdforge.distillers.gan_base import network
from kdforge.distillers.generator_base import GeneratorDistiller, keep_running_stats, no_weight_grads
from kdforge.engine import distributed
from kdforge.losses import kd_div
from kdforge.losses.mosaic import generator_terms, patch_gan_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("mosaic")
class MosaicKD(GeneratorDistiller):
    method = "mosaic"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, input_shape: tuple[int, ...] | None = None,
                 img_size: int | None = None, generator: str | nn.Module = "mosaic_generator",
                 generator_options: dict[str, Any] | None = None,
                 discriminator: str | nn.Module = "patch_discriminator",
                 discriminator_options: dict[str, Any] | None = None,
                 adv_weight: float = 1.0, align_weight: float = 1.0, local_weight: float = 1.0,
                 balance_weight: float = 10.0, temperature: float = 1.0, student_steps: int = 5,
                 synthetic_batch_size: int | None = None, generator_lr: float = 1e-3,
                 generator_betas: tuple[float, float] = (0.5, 0.999), generator_schedule: str | None = "cosine",
                 image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None,
                 snapshot_size: int = 256) -> None:
        super().__init__(student, teacher, generator=generator, generator_options=generator_options,
                         input_shape=input_shape, img_size=img_size, image_mean=image_mean, image_std=image_std,
                         generator_lr=generator_lr, generator_betas=generator_betas,
                         generator_schedule=generator_schedule, snapshot_size=snapshot_size)
        if min(adv_weight, align_weight, local_weight, balance_weight) < 0 or temperature <= 0:
            raise ValueError("mosaic: weights must be >= 0 and temperature > 0")
        if student_steps < 1:
            raise ValueError(f"mosaic: student_steps must be >= 1, got {student_steps}")
        size = self.input_shape[-1] if self.input_shape else getattr(self.generator, "img_size", 32)
        self.discriminator = network(discriminator, discriminator_options, {"img_size": size}, method="mosaic",
                                     role="discriminator")
        self.weights = dict(adv_weight=adv_weight, align_weight=align_weight, local_weight=local_weight,
                            balance_weight=balance_weight)
        self.temperature, self.student_steps = temperature, student_steps
        self.synthetic_batch_size = synthetic_batch_size

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "discriminator": self.discriminator}

    def configure_optimizers(self, stage, cfg, steps):
        opts = super().configure_optimizers(stage, cfg, steps)
        if not self.weights["local_weight"]:  # no patch term: D never steps, so it gets no optimiser (nor schedule)
            return opts
        _, schedule = opts["generator"]  # D learns at G's pace (the official code: one lr and schedule for both)
        disc = torch.optim.Adam(self.discriminator.parameters(), lr=self.generator_lr, betas=self.generator_betas)
        return {**opts, "discriminator": (disc, schedule)}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        real = batch["image"]
        if real.shape[0] < self.student_steps:
            raise ValueError(f"mosaic: a batch of {real.shape[0]} OOD images cannot feed student_steps="
                             f"{self.student_steps} student steps; raise data.batch_size")
        chunks = real.chunk(self.student_steps)
        n_fake = self.synthetic_batch_size or chunks[0].shape[0]
        w = self.weights
        out: dict[str, torch.Tensor] = {}

        # record_function labels cost nothing unless a profiler listens (benchmarks/mosaic_cost.py does)
        with record_function("mosaic/generate"):
            fake = self.synthesize(n_fake)
        if fake.shape[1:] != real.shape[1:]:
            raise ValueError(f"mosaic: the generator makes {tuple(fake.shape[1:])} images but the OOD batches are "
                             f"{tuple(real.shape[1:])}: set img_size or generator_options (or data.resize)")
        if w["local_weight"]:
            with record_function("mosaic/discriminator"):
                loss_d = w["local_weight"] * (patch_gan_loss(self.discriminator(chunks[0]), real=True)
                                              + patch_gan_loss(self.discriminator(fake.detach()), real=False)) / 2
                out["disc"] = self.optimizer_step("discriminator", loss_d)

        with record_function("mosaic/generator"):
            with no_weight_grads(self.student, self.discriminator), \
                    keep_running_stats(self.student, self.discriminator):
                t_logits, _ = self.run_teacher(batch, fake, grad=True)
                s_logits = self.student(fake)
                d_logits = self.discriminator(fake) if w["local_weight"] else None
                # p_bar over the global batch: under data parallel every rank's synthetic images (gathered)
                all_t = distributed.gather_batch(t_logits)[0] if w["balance_weight"] else None
                terms = generator_terms(t_logits, s_logits, d_logits, temperature=1.0, balance_logits=all_t, **w)
            self.optimizer_step("generator", sum(terms.values()))
        out.update({k: v.detach() for k, v in terms.items()})

        kd = real.new_zeros(())
        for chunk in chunks:
            with record_function("mosaic/student_inputs"):
                with torch.no_grad(), keep_running_stats(self.generator):  # G's statistics: its own step only
                    x = torch.cat([self.synthesize(n_fake), chunk])
                    t_logits, _ = self.run_teacher(batch, x)
            with record_function("mosaic/student"):
                loss = kd_div(self.student(x), t_logits.float(), self.temperature)
                kd = kd + self.optimizer_step("student", loss)
        out["kd"] = kd / len(chunks)
        return out
