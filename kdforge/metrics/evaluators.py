"""Evaluators: what a run is scored by, chosen in a recipe (`eval: {name: classification}`) or passed to the API.

An evaluator is called as `evaluator(predict, loader, device, reference=None) -> {metric: value}`, where
`predict(batch)` is the model's output (a Distiller's `predict`: student logits, or images for a generator)
and `reference(batch)` the teacher's output for the same batch (None when there is no teacher). It says which
of its metrics is the one to watch (`monitor`) and whether higher is better (`mode`), so the plateau schedule,
a run's "best" epoch and `kdforge report` never assume top-1. Metric values are numbers or lists of numbers.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from kdforge.metrics.classification import evaluate_classifier
from kdforge.registry import EVALUATORS

Predict = Callable[[dict[str, Any]], Any]

#: name parts of metrics where lower is better: losses, errors, distances, fairness gaps
LOWER_IS_BETTER = {"loss", "l1", "l2", "mse", "mae", "rmse", "fid", "kid", "lpips", "nll", "bpd", "err", "error",
                   "gap", "ece", "deo", "diff"}


def guess_mode(metric: str) -> str:
    """'min' when lower is better for a metric named like this (loss, l1, fid, deo_m, eod_diff), else 'max'."""
    parts = set(re.split(r"[_\-.]", metric.lower()))
    return "min" if parts & LOWER_IS_BETTER or metric.lower().endswith(("loss", "error")) else "max"


class Evaluator:
    """Base class: subclasses set `monitor`/`mode` and implement `__call__`."""

    monitor: str = "loss"
    mode: str = "min"  # "max" when higher is better

    def __call__(self, predict: Predict, loader: Iterable, device: torch.device, *,
                 reference: Predict | None = None, to_batch: Callable | None = None) -> dict[str, Any]:
        raise NotImplementedError


def _check_not_empty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: the evaluation loader yielded no samples (an empty split or subset?)")


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
    """Top-1/top-5 accuracy and mean cross-entropy of logits; per-group accuracy when `num_groups` is known
    (from the option, else the loader's `num_groups`) and batches carry `group`."""

    monitor, mode = "top1", "max"

    def __init__(self, num_groups: int | None = None, group_key: str = "group") -> None:
        self.num_groups, self.group_key = num_groups, group_key

    def __call__(self, predict, loader, device, *, reference=None, to_batch=None):
        groups = self.num_groups or getattr(loader, "num_groups", None)
        return evaluate_classifier(predict, loader, device, to_batch=to_batch, group_key=self.group_key,
                                   num_groups=groups)


@EVALUATORS.register("groups")
class GroupEvaluator(ClassificationEvaluator):
    """Classification plus the per-(group, class) accuracy table and the worst-group accuracy, for fairness
    work; batches must carry the group attribute."""

    monitor, mode = "top1", "max"

    def __call__(self, predict, loader, device, *, reference=None, to_batch=None):
        out = super().__call__(predict, loader, device, reference=reference, to_batch=to_batch)
        if "group_top1" not in out:
            raise ValueError(f"groups evaluator: batches carry no {self.group_key!r} attribute, or the number of "
                             "groups is unknown (set eval.num_groups)")
        out["worst_group_top1"] = min(out["group_top1"])
        return out


@EVALUATORS.register("images")
class ImageEvaluator(Evaluator):
    """Image-to-image quality of the model's output against `batch[target_key]` when batches carry it, else
    against the teacher's output (distillation fidelity): L1, MSE, PSNR and SSIM (torchmetrics), images in
    both compared as produced (no de-normalisation); `data_range` defaults to the target's range per batch."""

    monitor, mode = "psnr", "max"

    def __init__(self, target_key: str = "target", data_range: float | None = None) -> None:
        self.target_key, self.data_range = target_key, data_range

    @torch.no_grad()
    def __call__(self, predict, loader, device, *, reference=None, to_batch=None):
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        sums = {"l1": 0.0, "mse": 0.0, "psnr": 0.0, "ssim": 0.0}
        n = 0
        for raw in loader:
            batch = to_batch(raw, device) if to_batch else raw
            out = predict(batch).float()
            if self.target_key in batch:
                target = batch[self.target_key].float()
            elif reference is not None:
                target = reference(batch).float()
            else:
                return {}  # nothing to compare with (e.g. a teacher scored without targets)
            if out.shape != target.shape:
                raise ValueError(f"images evaluator: output {tuple(out.shape)} and target {tuple(target.shape)} "
                                 "differ in shape")
            b = out.shape[0]
            rng = self.data_range or float((target.amax() - target.amin()).clamp_min(1e-8))
            sums["l1"] += float(F.l1_loss(out, target, reduction="sum")) / out[0].numel()
            sums["mse"] += float(F.mse_loss(out, target, reduction="sum")) / out[0].numel()
            psnr = peak_signal_noise_ratio(out, target, data_range=rng, reduction="none", dim=(1, 2, 3))
            sums["psnr"] += float(psnr.sum())
            if out.dim() == 4 and min(out.shape[-2:]) >= 11:  # SSIM's Gaussian window is 11 px
                sums["ssim"] += float(structural_similarity_index_measure(out, target, data_range=rng)) * b
            else:
                sums["ssim"] = float("nan")
            n += b
        _check_not_empty(n, "images")
        return {k: v / n for k, v in sums.items()}


def build_evaluator(name: str = "classification", **options: Any) -> Evaluator:
    """A registered evaluator by name (`kdforge list evaluators`), its options checked."""
    from kdforge.config import check_kwargs

    cls = EVALUATORS.get(name)
    check_kwargs(cls.__init__, options, f"evaluator {name!r}")
    return cls(**options)
