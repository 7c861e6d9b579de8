"""Tian, Krishnan & Isola 2020, "Contrastive representation distillation".

Student and teacher penultimate features are embedded (linear + L2 norm) into a shared space. Each
side is contrasted against a momentum memory bank of the other side's embeddings: the positive is the
same sample's entry, K negatives are drawn uniformly from the dataset, and the NCE objective with noise
1/N is applied in both directions. The memory banks are buffers, so they are checkpointed and resumed; under
data parallel every rank applies the whole global batch's bank update (gathered), so the banks stay identical.
Loss: ce_weight * CE + kd_weight * KD + crd_weight * (NCE_student_anchor + NCE_teacher_anchor); 0.8 is the
paper's weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch
from kdforge.distillers.feature_base import FeatureDistiller
from kdforge.engine import distributed
from kdforge.losses import crd_nce, crd_scores
from kdforge.registry import DISTILLERS


@DISTILLERS.register("crd")
class CRD(FeatureDistiller):
    loss_names = ("crd",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, n_data: int, student_layer: str = "auto:in",
                 teacher_layer: str = "auto:in", feat_dim: int = 128, num_negatives: int = 4096,
                 nce_temperature: float = 0.07, bank_momentum: float = 0.5, crd_weight: float = 0.8,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         weights={"crd": crd_weight}, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature)
        if n_data < 2:
            raise ValueError(f"crd: n_data (the training-set size) must be at least 2, got {n_data}")
        (s,), (t,) = self.feature_shapes(tuple(input_shape))
        s_dim, t_dim = math.prod(s[1:]), math.prod(t[1:])
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.n_data, self.k = n_data, min(num_negatives, n_data - 1)
        self.nce_temperature, self.bank_momentum = nce_temperature, bank_momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        gen = torch.Generator().manual_seed(0)  # bank init must not consume the run's RNG
        self.register_buffer("memory_s", (torch.rand(n_data, feat_dim, generator=gen) * 2 - 1) * stdv)
        self.register_buffer("memory_t", (torch.rand(n_data, feat_dim, generator=gen) * 2 - 1) * stdv)
        # normalisation constants Z, estimated once from the first batch (as in the paper's NCE setup)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def feature_losses(self, s_feats, t_feats, batch: Batch):
        if "index" not in batch:
            raise ValueError("crd needs batch['index'] (dataset indices) for its memory bank; kdforge loaders "
                           "provide it, a plain DataLoader must yield (image, label, index)")
        idx = batch["index"].long()
        es = F.normalize(self.embed_s(s_feats[0].flatten(1)), dim=1)
        et = F.normalize(self.embed_t(t_feats[0].flatten(1)), dim=1)
        neg = distributed.randint(self.n_data, idx.numel(), self.k, device=idx.device)  # this rank's block
        contrast = torch.cat([idx[:, None], neg], dim=1)
        out_s = crd_scores(es, self.memory_t[contrast].detach(), self.nce_temperature)  # student anchor
        out_t = crd_scores(et, self.memory_s[contrast].detach(), self.nce_temperature)  # teacher anchor
        if self.z_s < 0:  # over the global batch, so every rank divides by the same constants
            s_all, t_all = distributed.gather_batch(out_s.detach(), out_t.detach())
            self.z_s.fill_(float(s_all.mean()) * self.n_data)
            self.z_t.fill_(float(t_all.mean()) * self.n_data)
        out_s, out_t = out_s / self.z_s, out_t / self.z_t
        loss = crd_nce(out_s[:, 0], out_s[:, 1:], self.n_data) + crd_nce(out_t[:, 0], out_t[:, 1:], self.n_data)
        with torch.no_grad():  # every rank writes the whole global batch's entries: the banks stay identical
            idx, es, et = distributed.gather_batch(idx, es.detach().float(), et.detach().float())
            m = self.bank_momentum  # named apart from SGD's momentum, so the two never collide
            self.memory_s[idx] = F.normalize(m * self.memory_s[idx] + (1 - m) * es, dim=1)
            self.memory_t[idx] = F.normalize(m * self.memory_t[idx] + (1 - m) * et, dim=1)
        return {"crd": loss}
