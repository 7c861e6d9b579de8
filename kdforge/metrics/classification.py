"""Streaming classification metrics: top-k accuracy, confusion matrix, per-group accuracy table.

Each metric has `update(logits, labels[, groups])` and `compute()`; they accumulate integer counts, so
the result is exact whatever the batch size, and summing counts across processes is all DDP needs.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from kdforge.registry import METRICS


@METRICS.register("accuracy")
class Accuracy:
    def __init__(self, topk: Iterable[int] = (1, 5)) -> None:
        self.topk = tuple(topk)
        self.correct = {k: 0 for k in self.topk}
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k_max = min(max(self.topk), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices
        hit = top.eq(labels.view(-1, 1))
        for k in self.topk:
            self.correct[k] += int(hit[:, : min(k, k_max)].any(dim=1).sum())
        self.total += labels.numel()

    def compute(self) -> dict[str, float]:
        n = max(1, self.total)
        return {f"top{k}": 100.0 * self.correct[k] / n for k in self.topk}


@METRICS.register("confusion_matrix")
class ConfusionMatrix:
    """counts[true, predicted]."""

    def __init__(self, num_classes: int) -> None:
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = self.counts.shape[0]
        pred = logits.argmax(1).cpu()
        self.counts += torch.bincount(labels.cpu() * n + pred, minlength=n * n).view(n, n)

    def compute(self) -> torch.Tensor:
        return self.counts.clone()


@METRICS.register("group_accuracy")
class GroupAccuracy:
    """Accuracy per (group, class) cell: the table fairness metrics (DEO) are computed from."""

    def __init__(self, num_groups: int, num_classes: int) -> None:
        self.correct = torch.zeros(num_groups, num_classes, dtype=torch.long)
        self.total = torch.zeros(num_groups, num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        g_n, c_n = self.total.shape
        labels, groups = labels.cpu(), groups.cpu()
        if int(groups.max()) >= g_n or int(groups.min()) < 0:
            raise ValueError(f"group ids must lie in [0, {g_n}); got range [{int(groups.min())}, {int(groups.max())}]")
        cell = groups * c_n + labels
        hit = logits.argmax(1).cpu().eq(labels).long()
        self.total += torch.bincount(cell, minlength=g_n * c_n).view(g_n, c_n)
        self.correct += torch.bincount(cell, weights=hit.double(), minlength=g_n * c_n).long().view(g_n, c_n)

    def table(self) -> torch.Tensor:
        """Accuracy in % per (group, class); NaN for an empty cell."""
        return 100.0 * self.correct.double() / self.total.double()

    def compute(self) -> dict[str, Any]:
        g_tot = self.total.sum(1).clamp_min(1).double()
        per_group = (100.0 * self.correct.sum(1).double() / g_tot).tolist()
        return {"group_top1": per_group, "group_gap": max(per_group) - min(per_group)}


@torch.no_grad()
def evaluate_classifier(predict, loader: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
                        *, to_batch=None, group_key: str = "group", num_groups: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean cross-entropy of `predict(batch) -> logits` over `loader`.

    When batches carry `group_key` and `num_groups` is given, the per-group accuracy is added too.
    """
    acc = Accuracy((1, 5))
    groups: GroupAccuracy | None = None  # built once the class count is known
    loss_sum, n = 0.0, 0
    for raw in loader:
        batch = to_batch(raw, device) if to_batch else raw
        logits = predict(batch).float()
        labels = batch["label"]
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += labels.numel()
        acc.update(logits, labels)
        if num_groups and group_key in batch:
            if groups is None:
                groups = GroupAccuracy(num_groups, logits.shape[1])
            groups.update(logits, labels, batch[group_key])
    if n == 0:  # zeros would read as a real (terrible) score
        raise ValueError("evaluation loader yielded no samples (an empty split or subset?)")
    out: dict[str, Any] = {**acc.compute(), "loss": loss_sum / n}
    if groups is not None:
        out.update(groups.compute())
    return out
