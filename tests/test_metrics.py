"""Streaming metrics against naive per-sample counts, whatever the batch split."""
from __future__ import annotations

import pytest
import torch

from kdforge.metrics import Accuracy, ConfusionMatrix, GroupAccuracy, evaluate_classifier


def _data(n=97, classes=7, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g),
            torch.randint(0, groups, (n,), generator=g))


@pytest.mark.parametrize("chunk", [1, 10, 97])
def test_accuracy_matches_naive_topk(chunk):
    logits, labels, _ = _data()
    acc = Accuracy((1, 3, 5))
    for i in range(0, len(labels), chunk):
        acc.update(logits[i:i + chunk], labels[i:i + chunk])
    got = acc.compute()
    for k in (1, 3, 5):
        hits = 0
        for row, y in zip(logits.tolist(), labels.tolist()):
            order = sorted(range(len(row)), key=lambda j: -row[j])
            hits += y in order[:k]
        assert got[f"top{k}"] == pytest.approx(100.0 * hits / len(labels))


def test_confusion_matrix_and_group_table_match_naive_counts():
    logits, labels, groups = _data()
    cm, ga = ConfusionMatrix(7), GroupAccuracy(3, 7)
    for i in range(0, len(labels), 13):
        cm.update(logits[i:i + 13], labels[i:i + 13])
        ga.update(logits[i:i + 13], labels[i:i + 13], groups[i:i + 13])
    pred = logits.argmax(1).tolist()
    naive = [[0] * 7 for _ in range(7)]
    cell_hit = [[0] * 7 for _ in range(3)]
    cell_n = [[0] * 7 for _ in range(3)]
    for p, y, g in zip(pred, labels.tolist(), groups.tolist()):
        naive[y][p] += 1
        cell_n[g][y] += 1
        cell_hit[g][y] += p == y
    assert cm.compute().tolist() == naive
    table = ga.table()
    for g in range(3):
        for c in range(7):
            if cell_n[g][c]:
                assert table[g, c].item() == pytest.approx(100.0 * cell_hit[g][c] / cell_n[g][c])
            else:
                assert torch.isnan(table[g, c])
    per_group = ga.compute()["group_top1"]
    for g in range(3):
        assert per_group[g] == pytest.approx(100.0 * sum(cell_hit[g]) / sum(cell_n[g]))
    assert ga.compute()["group_gap"] == pytest.approx(max(per_group) - min(per_group))


def test_group_ids_out_of_range_are_named():
    logits, labels, _ = _data(n=4)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        GroupAccuracy(2, 7).update(logits, labels, torch.tensor([0, 1, 2, 0]))


def test_evaluate_classifier_reports_mean_ce_and_groups():
    logits, labels, groups = _data()
    batches = [{"logits": logits[i:i + 20], "label": labels[i:i + 20], "group": groups[i:i + 20]}
               for i in range(0, 97, 20)]
    out = evaluate_classifier(lambda b: b["logits"], batches, num_groups=3)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert out["loss"] == pytest.approx(ce, rel=1e-5)
    assert len(out["group_top1"]) == 3
