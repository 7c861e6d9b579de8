"""Group fairness metrics (DEO_A/DEO_M of MFD, fairlearn-style one-vs-rest gaps) from streaming counts, the
`fairness` evaluator, the fairness plots and their place in a run's report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_net

from kdforge.config import load_config
from kdforge.data.loader import BatchLoader
from kdforge.metrics import FairnessEvaluator, GroupConfusion, build_evaluator
from kdforge.metrics.evaluators import ClassificationEvaluator
from kdforge.report import write_run_report
from kdforge.report.fairness_plots import group_accuracy_bars, penultimate_features, tsne_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _naive(pred: list[int], label: list[int], group: list[int], classes: int, groups: int) -> dict:
    """The paper's Eqs. 1-2 and the one-vs-rest rates, written as loops over samples (rates in %)."""
    def rate(hit, keep):
        sel = [h for h, k in zip(hit, keep) if k]
        return 100.0 * sum(sel) / len(sel) if sel else None  # None: an empty cell, skipped

    def spread(rates):
        rates = [r for r in rates if r is not None]
        return max(rates) - min(rates) if len(rates) >= 2 else 0.0

    tpr_gap, fpr_gap = [], []
    for c in range(classes):
        hit = [p == c for p in pred]
        tpr_gap.append(spread([rate(hit, [y == c and a == g for y, a in zip(label, group)]) for g in range(groups)]))
        fpr_gap.append(spread([rate(hit, [y != c and a == g for y, a in zip(label, group)]) for g in range(groups)]))
    table = [[rate([p == y for p, y in zip(pred, label)], [y == c and a == g for y, a in zip(label, group)])
              for c in range(classes)] for g in range(groups)]
    return {"deo_a": sum(tpr_gap) / classes, "deo_m": max(tpr_gap),
            "eod_diff": sum(max(t, f) for t, f in zip(tpr_gap, fpr_gap)) / classes, "table": table}


def _random(n: int, classes: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels, groups where the prediction is right more often for group 0 (a real gap)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    grp = torch.randint(0, groups, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 1.5 * (grp == 0).float() + 0.5
    return logits, labels, grp


def _check_against_naive(out: dict, logits, labels, groups, classes: int, num_groups: int) -> None:
    ref = _naive(logits.argmax(1).tolist(), labels.tolist(), groups.tolist(), classes, num_groups)
    for key in ("deo_a", "deo_m", "eod_diff"):
        assert out[key] == pytest.approx(ref[key], abs=1e-9), key
    assert out["eo_diff"] == pytest.approx(ref["deo_a"], abs=1e-9)
    for row, ref_row in zip(out["group_class_top1"], ref["table"]):
        assert [None if math.isnan(x) else pytest.approx(x) for x in row] == ref_row


def test_hand_made_case_with_an_empty_cell_a_single_group_class_and_an_absent_class():
    # (group, label, pred); class 1 only in group 0; class 3 nowhere; 4 classes in the mean
    rows = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 1, 1), (0, 2, 2), (1, 2, 0), (1, 2, 2), (1, 2, 1), (1, 2, 2)]
    g, y, p = (torch.tensor(col) for col in zip(*rows))
    m = GroupConfusion(num_groups=2, num_classes=4)
    m.update(p, y, g)  # predicted classes are accepted as well as logits
    out = m.compute()
    # class gaps: 0 -> |50 - 100| = 50, 1 -> 0 (one group), 2 -> |100 - 50| = 50, 3 -> 0 (no samples)
    assert out["deo_a"] == pytest.approx(100 / 4) and out["deo_m"] == pytest.approx(50)
    # false-positive gaps: class 0 |0 - 25|, class 1 |33.3 - 20|, class 2 and 3: 0
    assert out["eod_diff"] == pytest.approx((50 + 40 / 3 + 50 + 0) / 4)
    assert out["group_top1"] == pytest.approx([75.0, 60.0]) and out["worst_group_top1"] == pytest.approx(60.0)
    assert out["group_class_top1"][0] == pytest.approx([50.0, 100.0, 100.0, math.nan], nan_ok=True)
    assert out["group_class_top1"][1] == pytest.approx([100.0, math.nan, 50.0, math.nan], nan_ok=True)
    _check_against_naive(out, torch.nn.functional.one_hot(p, 4).float(), y, g, 4, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_predictions_match_the_naive_formulas(seed):
    classes, groups = 7, 3
    logits, labels, grp = _random(150, classes, groups, seed)  # small cells: some are empty by chance
    m = GroupConfusion(groups, classes)
    m.update(logits, labels, grp)
    _check_against_naive(m.compute(), logits, labels, grp, classes, groups)


def test_streaming_over_batches_equals_one_batch():
    logits, labels, grp = _random(203, 5, 4, seed=3)
    whole, parts = GroupConfusion(4, 5), GroupConfusion(4, 5)
    whole.update(logits, labels, grp)
    for lo, hi in [(0, 1), (1, 64), (64, 64), (64, 150), (150, 203)]:  # uneven, one empty
        parts.update(logits[lo:hi], labels[lo:hi], grp[lo:hi])
    assert torch.equal(whole.counts, parts.counts)
    assert json.dumps(whole.compute()) == json.dumps(parts.compute())


def test_out_of_range_groups_are_named():
    m = GroupConfusion(2, 3)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 2\)"):
        m.update(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 2]))


def test_fairlearn_style_differences_match_fairlearn_one_vs_rest():
    fl = pytest.importorskip("fairlearn.metrics", reason="fairlearn (a dev-only test oracle) is not installed")
    classes, groups = 4, 3
    logits, labels, grp = _random(900, classes, groups, seed=4)
    m = GroupConfusion(groups, classes)
    m.update(logits, labels, grp)
    assert int((m.counts.sum(2) == 0).sum()) == 0  # fairlearn counts an empty cell as rate 0; we skip it
    out = m.compute()
    pred, y, a = logits.argmax(1).numpy(), labels.numpy(), grp.numpy()
    eo, eod = [], []
    for c in range(classes):
        yc, pc = (y == c).astype(int), (pred == c).astype(int)
        eo.append(fl.equal_opportunity_difference(yc, pc, sensitive_features=a))
        frame = fl.MetricFrame(metrics=fl.true_positive_rate, y_true=yc, y_pred=pc, sensitive_features=a)
        assert frame.difference() == pytest.approx(eo[-1])
        eod.append(fl.equalized_odds_difference(yc, pc, sensitive_features=a))
    assert out["eo_diff"] == pytest.approx(100 * np.mean(eo), abs=1e-9)
    assert out["eod_diff"] == pytest.approx(100 * np.mean(eod), abs=1e-9)
    assert out["deo_m"] == pytest.approx(100 * max(eo), abs=1e-9)  # the paper's worst class


EXPECTED_KEYS = {"top1", "top5", "loss", "deo_a", "deo_m", "eo_diff", "eod_diff", "group_class_top1", "group_top1",
                 "worst_group_top1"}


def test_fairness_evaluator_on_a_tiny_model(synth, val_loader, single_thread):
    model = tiny_net(seed=3).eval()
    predict = torch.no_grad()(lambda b: model(b["image"]))
    evaluator = build_evaluator("fairness")
    assert (evaluator.monitor, evaluator.mode) == ("top1", "max")
    out = evaluator(predict, val_loader, "cpu")
    assert EXPECTED_KEYS <= out.keys()
    assert val_loader.num_groups == 2 and len(out["group_class_top1"]) == 2 and len(out["group_class_top1"][0]) == 10
    assert out["top1"] == pytest.approx(ClassificationEvaluator()(predict, val_loader, "cpu")["top1"])
    assert out["worst_group_top1"] == pytest.approx(min(out["group_top1"]))
    # the same numbers from the whole split in one go
    batch = next(iter(BatchLoader(synth["test"], len(synth["test"]), shuffle=False, prefetch=0)))
    logits = predict(batch)
    _check_against_naive(out, logits, batch["label"], batch["group"], 10, 2)


def test_fairness_evaluator_needs_groups():
    batches = [{"image": torch.randn(4, 3), "label": torch.tensor([0, 1, 0, 1])}]
    predict = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="carries no 'group' attribute"):
        FairnessEvaluator(num_groups=2)(lambda b: predict(b["image"]), batches, "cpu")
    with pytest.raises(ValueError, match="number of groups is unknown"):
        FairnessEvaluator()(lambda b: predict(b["image"]), batches, "cpu")


def test_group_accuracy_bars_write_a_png(tmp_path):
    # as read back from summary.json: NaN kept as the string 'nan'
    table = [[90.0, 70.0, "nan"], [80.0, 75.5, 40.0]]
    path = group_accuracy_bars(table, tmp_path / "bars.png", class_names=["a", "b", "c"],
                               group_names=["colour", "grey"])
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="class names"):
        group_accuracy_bars(table, tmp_path / "x.png", class_names=["a"])


def test_penultimate_features_and_tsne_plot(tmp_path, val_loader, single_thread):
    model = tiny_net(seed=3).train()
    feats, labels, groups = penultimate_features(model, val_loader, max_samples=20)
    assert feats.shape == (20, 32) and labels.shape == groups.shape == (20,)
    assert model.training and not model.linear._forward_hooks  # mode restored, hook removed
    model.eval()
    batch = next(iter(val_loader))
    with torch.no_grad():
        x = torch.relu(model.bn1(model.conv1(batch["image"])))
        expected = model.avgpool(model.layer3(model.layer2(model.layer1(x)))).flatten(1)
    torch.testing.assert_close(penultimate_features(model, val_loader)[0], expected)

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 120)
    f = rng.normal(size=(120, 16)) + y[:, None]
    path = tsne_plot(f, y, rng.integers(0, 2, 120), tmp_path / "tsne.png", max_samples=100)
    assert path.read_bytes()[:8] == PNG_MAGIC
    path = tsne_plot(f, y, y % 2, tmp_path / "tsne2d.png", n_components=2, max_samples=100)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_run_report_draws_the_group_table_and_embeds_tsne(tmp_path):
    cfg = load_config(None, base={"name": "fair", "seed": 0, "out_dir": str(tmp_path), "data": {"name": "synthetic"},
                                  "student": {"name": "resnet20"}, "teacher": {"name": "resnet56"},
                                  "method": {"name": "kd"}, "train": {"epochs": 1, "progress": False}})
    table = [[90.0, float("nan")], [70.0, 60.0]]
    metrics = {"top1": 75.0, "deo_a": 10.0, "deo_m": 20.0, "group_top1": [90.0, 65.0], "group_class_top1": table}
    run_dir = Path(tmp_path / "run")
    run_dir.mkdir()
    (run_dir / "tsne.png").write_bytes(PNG_MAGIC)
    result = SimpleNamespace(metrics=metrics, teacher_metrics={**metrics, "top1": 80.0}, history=[])
    report = write_run_report(run_dir, cfg, result, evaluator="fairness").read_text()
    assert (run_dir / "group_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "group_accuracy_teacher.png").exists()
    assert "](group_accuracy.png)" in report and "](group_accuracy_teacher.png)" in report
    assert "](tsne.png)" in report
    assert "`group_class_top1`, one value per index" not in report  # a 2-D table is drawn, not listed by index
    assert "per-group top-1" in report  # 1-D lists keep their table
