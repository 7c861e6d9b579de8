"""Jung et al. 2021, "Fair feature distillation for visual recognition" (MFD).

The student matches, for every class y and group a, its features of the (y, a) cell to the teacher's
features of class y (an MMD, Eq. 5-6), so what it learns about a class does not depend on the group:
    ce_weight * CE + kd_weight * T^2 KL (optional, the paper's lambda_h) + mfd_weight / 2 * sum_{y,a} MMD^2.
`mfd_weight` is the paper's lambda (3 for CIFAR-10S and UTKFace, 7 for CelebA). Without a teacher this is
the MFD-F ablation (targets from the student's own detached class features); `joint: true` is MFD-K (one MMD
over the batch, ignoring classes and groups). Teacher and student features must have as many values per sample
(the paper distils a teacher of the student's architecture). Batches must carry `group`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Distiller
from kdforge.engine import distributed
from kdforge.losses import kd_div
from kdforge.losses.mfd import mfd_loss
from kdforge.registry import DISTILLERS


@DISTILLERS.register("mfd")
class MFD(Distiller):
    needs_teacher = False  # MFD-F runs without one

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, num_classes: int, num_groups: int,
                 mfd_weight: float = 3.0, ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 3.0,
                 student_layer: str = "auto:in", teacher_layer: str = "auto:in", sigma: float = 1.0,
                 kernel: str = "rbf", bandwidth: str = "batch", target: str = "class", joint: bool = False,
                 balanced_batches: bool = False) -> None:
        self.student_features = (student_layer,)
        self.teacher_features = (teacher_layer,) if teacher is not None else ()
        super().__init__(student, teacher)
        if min(mfd_weight, ce_weight, kd_weight) < 0 or temperature <= 0:
            raise ValueError("mfd: weights must be >= 0 and temperature > 0")
        if kd_weight and teacher is None:
            raise ValueError("mfd: kd_weight > 0 needs a teacher")
        self.num_classes, self.num_groups = num_classes, num_groups
        self.mfd_weight, self.ce_weight, self.kd_weight = mfd_weight, ce_weight, kd_weight
        self.temperature = temperature
        self.mmd = dict(num_classes=num_classes, num_groups=num_groups, sigma=sigma, kernel=kernel,
                        bandwidth=bandwidth, target=target, joint=joint)
        self.balanced_batches = balanced_batches

    def train_sampler(self):
        """The official code's `--labelwise` batches: every (group, class) cell equally in every batch."""
        if not self.balanced_batches:
            return None
        from kdforge.data.samplers import GroupClassBalancedSampler

        return GroupClassBalancedSampler(batchwise=True)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if "group" not in batch:
            raise ValueError("mfd needs batch['group'] (the sensitive attribute of each sample): use a dataset "
                             "with a group attribute (cifar10s, utkface, celeba) or IndexedDataset(..., group=...)")
        s_logits, (s_feat,) = self.run_student(batch["image"])
        out = {"ce": self.ce_weight * F.cross_entropy(s_logits, batch["label"])}
        t_feat = None
        if self.teacher is not None:
            t_logits, (t_feat,) = self.run_teacher(batch)
            if self.kd_weight:
                out["kd"] = self.kd_weight * kd_div(s_logits, t_logits.float(), self.temperature)
        with torch.autocast(s_feat.device.type, enabled=False):  # exp of distance differences needs fp32
            # the kernels over the global batch's samples (gathered over ranks under data parallel)
            s_all, label, group = distributed.gather_batch(s_feat.float(), batch["label"], batch["group"])
            t_all = None if t_feat is None else distributed.gather_batch(t_feat.float())[0]
            mmd = mfd_loss(s_all, t_all, label, group, **self.mmd)
        out["mfd"] = self.mfd_weight / 2 * mmd
        return out
