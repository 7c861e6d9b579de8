"""Maximum-likelihood training of a normalizing flow (Glow; Kingma & Dhariwal 2018): how the flow-distillation
teacher is trained (`kdforge train recipes/flow/utkface/glow.yaml`). No teacher.

The loader's images must be in [0, 1] (a recipe sets data.mean = 0, data.std = 1); the flow dequantises them
itself (`flow.preprocess`: n_bits levels plus uniform noise from the global RNG, which checkpoints save) and the loss
is its bits per dimension, mean over the batch (`flow.bits_per_dim`, the paper's objective). One optimiser, the
recipe's (the paper: Adam, lr warmed up linearly from 0, `train.warmup_epochs`). Glow's ActNorm initialises itself
on the first training batch (a buffer: resume keeps it).

`predict` hands the "flow" evaluator, per batch: the model-space input, its bits/dim (bin-centre dequantisation,
deterministic) and decode(encode(x)) (`recon_teacher`: the flow's exact invertibility, which the report checks);
`epoch_snapshot` decodes fixed codes at several temperatures (the paper's Fig. of samples).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.registry import DISTILLERS

SNAPSHOT_TEMPERATURES = (0.0, 0.5, 0.7, 1.0)


def check_flow(flow: nn.Module, role: str) -> None:
    missing = [m for m in ("encode", "decode", "latent_shapes") if not hasattr(flow, m)]
    if missing:
        raise TypeError(f"the {role} ({type(flow).__name__}) is not a flow: it lacks {', '.join(missing)} "
                        "(kdforge's `glow` has them)")


@DISTILLERS.register("flow_mle")
class FlowMLE(Distiller):
    needs_teacher = False
    trains_alone = True
    model_kind = "flow"

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, bpd_weight: float = 1.0,
                 snapshot_size: int = 8) -> None:
        super().__init__(student, None)
        check_flow(student, "model")
        if not bpd_weight > 0:
            raise ValueError(f"flow_mle: bpd_weight must be > 0, got {bpd_weight}")
        self.bpd_weight = float(bpd_weight)
        g = torch.Generator().manual_seed(0)  # fixed snapshot codes, drawn without the global RNG
        self.register_buffer("snapshot_eps", torch.cat(
            [torch.randn(snapshot_size, *shape, generator=g).flatten(1) for shape in student.latent_shapes], 1))

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.student.preprocess(batch["image"])
        return {"bpd": self.bpd_weight * self.student.bits_per_dim(x).mean()}

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.student.preprocess(batch["image"])  # eval mode: bin centres, no RNG
        return {"input": x, "bits_per_dim": self.student.bits_per_dim(x),
                "recon_teacher": self.student.decode(self.student.encode(x))}

    @torch.no_grad()
    def epoch_snapshot(self) -> dict[str, Any]:
        """Rows of samples from the same codes at temperatures 0, 0.5, 0.7, 1 (images in [0, 1])."""
        rows = [self.student.decode(self.snapshot_eps * t, standardized=True) for t in SNAPSHOT_TEMPERATURES]
        return {"samples": (torch.cat(rows) + 0.5).clamp(0, 1).cpu()}
