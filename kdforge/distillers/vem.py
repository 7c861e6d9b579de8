"""VEM (Kang et al., NeurIPS 2022, "Information-Theoretic GAN Compression with Variational Energy-based Model"):
the generator-distillation baseline (`gan_kd`) plus a variational lower bound on the mutual information between
the teacher's image t (on paired data: the real target, Sec. 5.3) and the student's image s, with an energy-based
variational distribution q(t | s) proportional to exp(-E(t, s)) (Eq. 4; kdforge.losses.vem).

Each training step, in the paper's order (Sec. 3), on the same batch:
  1. energy model: t~ = K-step Langevin chain on E(., s) started from `chain_init` (the student's image, Sec. 4.1.3;
     "noise" or "teacher" for the ablation), in float32 whatever the run's precision; E steps on
     mean E(t, s) - mean E(t~, s) [+ energy_reg_weight * mean(E^2)] (Eq. 5-6), optimiser "energy" (Adam
     energy_lr, energy_betas);
  2. student: the baseline's loss + mi_weight * (mean E(t, s) - mean E(t~, s)) (Eq. 8-10: lambda_MI, Table 5:
     0.05-0.2), the gradient reaching only s; t~ is step 1's chain (the paper) or, with fresh_chain, a new chain
     under the updated E (the re-implementation);
  3. optionally the teacher (online_teacher, from gan_kd).
E is in eval mode while chains run and while it scores the student (its spectral-norm power iterations advance
only in its own step). Chain noise comes from the global RNG, which checkpoints save: resume is exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.gan_base import network, real_images
from kdforge.distillers.gan_kd import GeneratorKD
from kdforge.engine import distributed
from kdforge.losses.vem import energy_model_loss, langevin_sample, vem_student_loss
from kdforge.registry import DISTILLERS

CHAIN_INITS = ("student", "noise", "teacher")
MI_TARGETS = ("auto", "teacher", "target")


def check_mi_target(method: str, mi_target: str) -> str:
    if mi_target not in MI_TARGETS:
        raise ValueError(f"{method}: mi_target must be one of {', '.join(MI_TARGETS)}, got {mi_target!r}")
    return mi_target


def mi_reference(mi_target: str, t: torch.Tensor, batch: Batch) -> torch.Tensor:
    """What the student's output should carry information about: the teacher's image, or the real target on paired
    data ("auto": the target when the batch has one, as the paper does on Edges -> Shoes and Cityscapes)."""
    if mi_target == "teacher" or (mi_target == "auto" and "target" not in batch):
        return t
    if "target" not in batch:
        raise ValueError("mi_target 'target' needs paired batches (a 'target' image); this batch has none")
    return real_images(batch).float()


@DISTILLERS.register("vem")
class VEM(GeneratorKD):
    method = "vem"

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mi_weight: float = 0.1,
                 energy: str | nn.Module = "energy_net", energy_options: dict[str, Any] | None = None,
                 energy_lr: float = 1e-4, energy_betas: tuple[float, float] = (0.0, 0.999),
                 energy_reg_weight: float = 0.0, langevin_steps: int = 10, langevin_step_size: float = 100.0,
                 langevin_noise: float = 0.005, chain_init: str = "student", fresh_chain: bool = False,
                 mi_target: str = "auto", **baseline: Any) -> None:
        super().__init__(student, teacher, mi_weight=mi_weight, **baseline)
        if chain_init not in CHAIN_INITS:
            raise ValueError(f"vem: chain_init must be one of {', '.join(CHAIN_INITS)}, got {chain_init!r}")
        if langevin_steps < 0 or not langevin_step_size > 0 or langevin_noise < 0 or energy_reg_weight < 0:
            raise ValueError("vem: need langevin_steps >= 0, langevin_step_size > 0, langevin_noise >= 0 and "
                             "energy_reg_weight >= 0")
        size = self.input_shape[-1] if self.z_dim is None else getattr(student, "img_size", 32)
        self.energy = network(energy, energy_options, {"img_size": size}, method="vem", role="energy")
        self.energy_lr, self.energy_betas = float(energy_lr), tuple(energy_betas)
        self.energy_reg_weight = float(energy_reg_weight)
        self.chain = dict(steps=int(langevin_steps), step_size=float(langevin_step_size),
                          noise_std=float(langevin_noise))
        self.chain_init, self.fresh_chain = chain_init, bool(fresh_chain)
        self.mi_target = check_mi_target("vem", mi_target)

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "energy": self.energy}

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, Any]:
        energy = torch.optim.Adam(self.energy.parameters(), lr=self.energy_lr, betas=self.energy_betas)
        return {"energy": (energy, None), **super().configure_optimizers(stage, cfg, steps)}

    def mi_reference(self, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        return mi_reference(self.mi_target, t, batch)

    def sample_chain(self, reference: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """t~ ~ q(. | s): K Langevin steps on E(., s) from the chosen start, E in eval mode."""
        start = {"student": s, "teacher": reference}.get(self.chain_init)
        if start is None:
            start = distributed.randn(*s.shape, device=s.device, dtype=s.dtype)  # this rank's block
        s = s.detach().float()
        was = self.energy.training
        self.energy.eval()
        try:
            return langevin_sample(lambda x: self.energy(x, s), start, **self.chain)
        finally:
            self.energy.train(was)

    def mi_term(self, reference: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
                batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t_tilde = self.sample_chain(reference, s)
        loss_e = energy_model_loss(self.energy, reference, s, t_tilde, reg_weight=self.energy_reg_weight)
        log = {"energy": self.optimizer_step("energy", loss_e)}
        if self.fresh_chain:
            t_tilde = self.sample_chain(reference, s)
        self.energy.eval()  # score the student without advancing E's spectral-norm estimates
        try:
            mi = vem_student_loss(self.energy, reference, s, t_tilde)
        finally:
            self.energy.train(self.training)
        return mi, log
