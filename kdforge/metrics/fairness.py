"""Group fairness of a classifier from one streaming count table: a confusion matrix per group.

Everything here derives from `counts[g, y, p]`, the number of samples of group g with true class y predicted
as class p. Counts are integers, so every metric is exact whatever the batch size, and summing the tables of
several processes is all DDP needs.

Metrics (all in %, like the MFD paper's tables and kdforge's top-1):

- `deo_a`, `deo_m`: the multi-class equal-opportunity gap of MFD (Jung et al., CVPR 2022, Eqs. 1-2), which the
  paper calls "difference of equalized odds". Per class c, the gap is max_{a,a'} |acc(c, a) - acc(c, a')| with
  acc(c, g) = P(pred = c | y = c, group = g); DEO_A averages it over the classes, DEO_M takes the worst class.
  It conditions only on y = c (true-positive rates), so it is an equal-opportunity quantity, and it is not
  fairlearn's `equalized_odds_difference` (binary, and also compares false-positive rates).
- `eo_diff`: fairlearn's `equal_opportunity_difference` (spread of true-positive rates between groups) of the
  one-vs-rest problem "class c or not", averaged over classes. The one-vs-rest true-positive rate of class c
  is acc(c, g), so with every cell populated this equals `deo_a`; it is reported to compare with fairlearn.
- `eod_diff`: fairlearn's `equalized_odds_difference` (worst of the true- and false-positive-rate spreads)
  of the same one-vs-rest problems, averaged over classes.
- `group_class_top1`: acc(c, g) as a [group][class] table (NaN for an empty cell); `group_top1`: accuracy
  per group (NaN for an empty group); `worst_group_top1`: the lowest populated group's accuracy.

Edge cases, the same for every gap: a (class, group) cell without samples is skipped for that class (its
rate is undefined, not 0; fairlearn via scikit-learn counts it as 0); a class with fewer than two populated
groups (a single one, or none) contributes a gap of 0. Averages are over all `num_classes` classes, the
paper's 1/|Y|.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kdforge.metrics.classification import evaluate_classifier
from kdforge.metrics.evaluators import Evaluator
from kdforge.registry import EVALUATORS, METRICS


def _rates(hits: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """hits / totals in %, NaN where totals is 0 (an undefined rate, not a zero one)."""
    totals = totals.double()
    return torch.where(totals > 0, 100.0 * hits.double() / totals.clamp_min(1), torch.nan)


def _spread(rates: torch.Tensor) -> torch.Tensor:
    """Per column of a (groups, classes) rate table: max - min over the non-NaN rows; 0 with fewer than two."""
    ok = ~rates.isnan()
    hi = torch.where(ok, rates, -torch.inf).amax(0)
    lo = torch.where(ok, rates, torch.inf).amin(0)
    return torch.where(ok.sum(0) >= 2, hi - lo, torch.zeros_like(hi))


def group_class_accuracy(counts: torch.Tensor) -> torch.Tensor:
    """acc(c, g) = P(pred = c | y = c, group = g) in %, as a (groups, classes) table; NaN for an empty cell."""
    return _rates(counts.diagonal(dim1=1, dim2=2), counts.sum(2))


def equal_opportunity_gaps(counts: torch.Tensor) -> torch.Tensor:
    """Per class, the largest accuracy gap between populated groups (%): the summand of DEO_A/DEO_M."""
    return _spread(group_class_accuracy(counts))


def false_positive_gaps(counts: torch.Tensor) -> torch.Tensor:
    """Per class c, the spread over groups of P(pred = c | y != c, group) in %, one-vs-rest; empty cells skipped."""
    predicted_as = counts.sum(1)  # [g, p]: samples predicted as p, whatever their class
    negatives = counts.sum((1, 2)).unsqueeze(1) - counts.sum(2)  # [g, c]: samples whose class is not c
    false_pos = predicted_as - counts.diagonal(dim1=1, dim2=2)
    return _spread(_rates(false_pos, negatives))


def fairness_from_counts(counts: torch.Tensor) -> dict[str, Any]:
    """Every metric of this module (see its docstring) from a (groups, classes, classes) count table."""
    if counts.dim() != 3 or counts.shape[1] != counts.shape[2]:
        raise ValueError(f"counts must be (groups, classes, classes), got shape {tuple(counts.shape)}")
    table = group_class_accuracy(counts)
    tpr_gap = _spread(table)
    eod_gap = torch.maximum(tpr_gap, false_positive_gaps(counts))
    per_group = _rates(counts.diagonal(dim1=1, dim2=2).sum(1), counts.sum((1, 2)))
    populated = per_group[~per_group.isnan()]
    return {
        "deo_a": float(tpr_gap.mean()),
        "deo_m": float(tpr_gap.max()),
        "eo_diff": float(tpr_gap.mean()),  # the same numbers, fairlearn's name (module docstring)
        "eod_diff": float(eod_gap.mean()),
        "group_class_top1": table.tolist(),
        "group_top1": per_group.tolist(),
        "worst_group_top1": float(populated.min()) if populated.numel() else float("nan"),
    }


@METRICS.register("group_confusion")
class GroupConfusion:
    """Streaming per-group confusion matrix, `counts[group, true, predicted]`; `compute()` gives the fairness
    metrics of this module.

    >>> m = GroupConfusion(num_groups=2, num_classes=3)
    >>> m.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]), torch.tensor([0, 0, 1, 1]))
    >>> m.compute()["deo_m"]
    100.0
    """

    def __init__(self, num_groups: int, num_classes: int) -> None:
        self.counts = torch.zeros(num_groups, num_classes, num_classes, dtype=torch.long)

    def update(self, outputs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        """`outputs`: logits (B, C) or predicted classes (B,); labels and groups: (B,) integers."""
        g_n, c_n, _ = self.counts.shape
        pred = (outputs.argmax(1) if outputs.dim() == 2 else outputs).cpu().long()
        labels, groups = labels.cpu().long().view(-1), groups.cpu().long().view(-1)
        if not pred.numel() == labels.numel() == groups.numel():
            raise ValueError(f"{pred.numel()} predictions, {labels.numel()} labels and {groups.numel()} group ids "
                             "in one batch: they must match")
        if not groups.numel():
            return
        if int(groups.min()) < 0 or int(groups.max()) >= g_n:
            raise ValueError(f"group ids must lie in [0, {g_n}); got range [{int(groups.min())}, {int(groups.max())}]"
                             " (set eval.num_groups?)")
        if int(labels.min()) < 0 or int(labels.max()) >= c_n or int(pred.max()) >= c_n:
            raise ValueError(f"classes must lie in [0, {c_n}); got labels in [{int(labels.min())}, "
                             f"{int(labels.max())}] and predictions up to {int(pred.max())}")
        cell = (groups * c_n + labels) * c_n + pred
        self.counts += torch.bincount(cell, minlength=g_n * c_n * c_n).view(g_n, c_n, c_n)

    def compute(self) -> dict[str, Any]:
        return fairness_from_counts(self.counts)


@EVALUATORS.register("fairness")
class FairnessEvaluator(Evaluator):
    """Top-1/top-5 accuracy and mean cross-entropy, plus the group-fairness metrics of this module: deo_a,
    deo_m, eo_diff, eod_diff, group_class_top1, group_top1, worst_group_top1 (all in %).

    Batches must carry the group attribute (`group_key`); the number of groups comes from `num_groups`, else
    the loader's `num_groups`. It watches top-1 (higher is better) by default; to pick the fairest epoch
    instead, set `eval: {name: fairness, monitor: deo_m, mode: min}` in a recipe.
    """

    monitor, mode = "top1", "max"

    def __init__(self, num_groups: int | None = None, group_key: str = "group") -> None:
        self.num_groups, self.group_key = num_groups, group_key

    def __call__(self, predict: Callable, loader: Iterable, device: torch.device, *, reference=None,
                 to_batch: Callable | None = None) -> dict[str, Any]:
        num_groups = self.num_groups or getattr(loader, "num_groups", None)
        if not num_groups:
            raise ValueError("fairness evaluator: the number of groups is unknown; set eval.num_groups or give "
                             f"the loader a `num_groups` (data with a {self.group_key!r} attribute)")
        table: list[GroupConfusion] = []  # built on the first batch, once the class count is known

        def counted(batch: dict[str, Any]) -> torch.Tensor:
            # top-1/top-5/loss come from evaluate_classifier; this taps the same logits for the group counts
            if self.group_key not in batch:
                raise ValueError(f"fairness evaluator: a batch carries no {self.group_key!r} attribute "
                                 f"(keys: {', '.join(map(str, batch))}); fairness needs a group per sample")
            logits = predict(batch)
            if not table:
                table.append(GroupConfusion(int(num_groups), logits.shape[1]))
            table[0].update(logits, batch["label"], batch[self.group_key])
            return logits

        out = evaluate_classifier(counted, loader, device, to_batch=to_batch, num_groups=None)
        out.update(table[0].compute())
        return out
