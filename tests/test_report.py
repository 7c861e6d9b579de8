"""Run reports and the many-run table: metric names come from the evaluator, runs are grouped by their
configuration minus seed, copies count once, broken summaries are skipped by name, "best" respects mode."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.report import aggregate, write_run_report


def _cfg(tmp_path: Path, name: str, seed: int = 0, method: dict | None = None, teacher: str | None = "resnet56",
         student: str = "resnet20", **train):
    return load_config(None, base={
        "name": name, "seed": seed, "out_dir": str(tmp_path / "runs"), "data": {"name": "synthetic"},
        "student": {"name": student}, "teacher": {"name": teacher} if teacher else None,
        "method": method or {"name": "kd"}, "train": {"epochs": 3, "progress": False, **train}})


def _result(metrics: dict, teacher_metrics: dict | None = None, history: list | None = None, **extra):
    return SimpleNamespace(metrics=metrics, teacher_metrics=teacher_metrics, history=history or [], **extra)


def _run(tmp_path: Path, name: str, seed: int = 0, metrics: dict | None = None, teacher_metrics: dict | None = None,
         method: dict | None = None, **kw) -> Path:
    """A run folder made by write_run_report from a fake result (no training)."""
    cfg = _cfg(tmp_path, name, seed, method)
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    write_run_report(run_dir, cfg, _result(metrics or {"top1": 50.0 + seed, "top5": 90.0, "loss": 1.5},
                                           teacher_metrics), **kw)
    return run_dir


def _rows(table: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `table`, as stripped cells."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _column(table: str, header_part: str) -> int:
    """The index of the column named `header_part` (exactly, else the first header containing it)."""
    header = [c.strip() for c in next(ln for ln in table.splitlines() if ln.startswith("|")).strip("|").split("|")]
    if header_part in header:
        return header.index(header_part)
    return next(i for i, h in enumerate(header) if header_part in h)


# ------------------------------------------------------------------------------------------- one run
IMAGE_HISTORY = [
    {"kind": "epoch", "epoch": 1, "lr": 0.1, "train_rec": 0.9, "train_loss": 1.2, "val_psnr": 20.5, "val_l1": 0.09},
    {"kind": "epoch", "epoch": 2, "lr": 0.05, "train_rec": 0.5, "train_loss": 0.8, "val_psnr": 24.25, "val_l1": 0.04},
    {"kind": "epoch", "epoch": 3, "lr": 0.01, "train_rec": 0.4, "train_loss": 0.7, "val_psnr": 23.0, "val_l1": 0.05},
]


def test_report_follows_the_evaluator_metric_names(tmp_path):
    """An image evaluator's {psnr, l1} (no top-1 anywhere): columns, per-epoch table, curves and best."""
    cfg = _cfg(tmp_path, "ae", student="unet", teacher="unet_big", method={"name": "kd"})
    run_dir = tmp_path / "ae"
    run_dir.mkdir()
    result = _result({"psnr": 23.0, "l1": 0.05, "channel_psnr": [22.0, 23.5, 23.5]},
                     {"psnr": 31.5, "l1": 0.01, "channel_psnr": [31.0, 32.0, 31.5]}, IMAGE_HISTORY,
                     networks={"encoder": nn.Linear(4, 2), "decoder": nn.Linear(2, 4)})
    path = write_run_report(run_dir, cfg, result, monitor="psnr", mode="max", evaluator="image")
    report = path.read_text()
    assert "top-1" not in report and "n/a" not in report
    model_table = report.split("\n\n")[2]
    header = model_table.splitlines()[0]
    assert "PSNR" in header and "l1" in header and "channel_psnr" not in header
    teacher_row, student_row = model_table.splitlines()[2:4]
    assert "31.50" in teacher_row and "0.0100" in teacher_row
    assert "23.00" in student_row and "0.0500" in student_row
    # the list metric gets its own small table, one row per entry
    assert "| 1 | 32.00 | 23.50 |" in report  # index, teacher, student
    per_epoch = report.split("## Per epoch", 1)[1]
    for key in ("train_rec", "train_loss", "val_psnr", "val_l1"):
        assert key in per_epoch
    assert "best" in report.lower() and "24.25" in report and "epoch 2" in report
    assert "encoder" in report and "decoder" in report  # trained networks and their sizes

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == {"name": "psnr", "mode": "max", "best": 24.25, "best_epoch": 2}
    assert summary["metrics"]["psnr"] == 23.0 and summary["teacher_metrics"]["l1"] == 0.01
    assert summary["evaluator"] == "image"
    assert set(summary["params"]) == {"encoder", "decoder"} and summary["params"]["encoder"] == 10
    assert (run_dir / "curves.png").exists()


def test_curves_plot_the_monitor_metric_by_name(tmp_path):
    from kdforge.report.run_report import curves_figure

    fig = curves_figure(IMAGE_HISTORY, monitor="l1", mode="min")
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "l1" in titles and "top-1" not in titles
    (monitor_ax,) = [ax for ax in fig.axes if "l1" in ax.get_title()]
    assert list(monitor_ax.lines[0].get_ydata()) == [0.09, 0.04, 0.05]


def test_best_respects_mode_min(tmp_path):
    cfg = _cfg(tmp_path, "ae")
    run_dir = tmp_path / "ae"
    run_dir.mkdir()
    write_run_report(run_dir, cfg, _result({"psnr": 23.0, "l1": 0.05}, None, IMAGE_HISTORY), monitor="l1", mode="min")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == {"name": "l1", "mode": "min", "best": 0.04, "best_epoch": 2}
    with pytest.raises(ValueError, match="mode"):
        write_run_report(run_dir, cfg, _result({"l1": 0.05}), monitor="l1", mode="lowest")


def test_monitor_missing_from_metrics_is_said_not_invented(tmp_path):
    cfg = _cfg(tmp_path, "ae")
    run_dir = tmp_path / "ae"
    run_dir.mkdir()
    with pytest.warns(UserWarning, match="top1"):
        write_run_report(run_dir, cfg, _result({"psnr": 23.0}, None, IMAGE_HISTORY))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"]["best"] is None and summary["monitor"]["best_epoch"] is None


def test_teacher_metrics_shown_when_present_and_said_when_absent(tmp_path):
    run = _run(tmp_path, "kd_s0", teacher_metrics={"top1": 83.2, "top5": 98.95, "loss": 0.6})
    report = (run / "report.md").read_text()
    (teacher_row,) = [ln for ln in report.splitlines() if ln.startswith("| teacher")]
    assert "83.20" in teacher_row and "98.95" in teacher_row
    assert json.loads((run / "summary.json").read_text())["teacher_metrics"]["top1"] == 83.2
    # a teacher that was not evaluated is said so in words, not as a row of n/a
    run = _run(tmp_path, "kd_s1", seed=1)
    report = (run / "report.md").read_text()
    assert "n/a" not in report and "not evaluated" in report


# ------------------------------------------------------------------------------------------- many runs
def test_table_shows_teacher_of_same_teacher_and_data_from_any_run(tmp_path):
    """The benchmark evaluates the teacher once; every row with that teacher on that data shows it."""
    _run(tmp_path, "kd_s0", teacher_metrics={"top1": 83.2, "top5": 98.0, "loss": 0.6})
    _run(tmp_path, "at_s0", method={"name": "at", "beta": 1000.0})
    table = aggregate([tmp_path / "runs"])
    col = _column(table, "teacher top1")
    assert [r[col] for r in _rows(table)] == ["83.20", "83.20"]


def test_variants_of_one_method_are_told_apart(tmp_path):
    for seed in (0, 1):
        _run(tmp_path, f"fitnet_resnet20_from_resnet56_seed{seed}", seed,
             method={"name": "fitnet", "two_stage": True, "temperature": 4.0})
    _run(tmp_path, "fitnet1_resnet20_from_resnet56_seed0", 0, method={"name": "fitnet", "two_stage": False})
    # same recipe name, different options: the differing option labels the rows
    _run(tmp_path, "kd_s0", 0, method={"name": "kd", "temperature": 2.0})
    _run(tmp_path, "kd_s1", 1, method={"name": "kd", "temperature": 8.0})
    table = aggregate([tmp_path / "runs"])
    rows = _rows(table)
    seeds = _column(table, "seeds")
    labels = {r[_column(table, "run")]: r[seeds] for r in rows}
    assert labels["fitnet_resnet20_from_resnet56"] == "2"
    assert labels["fitnet1_resnet20_from_resnet56"] == "1"
    kd = sorted(k for k in labels if k.startswith("kd"))
    assert len(kd) == 2 and "temperature=2.0" in kd[0] and "temperature=8.0" in kd[1]


def test_run_only_settings_do_not_split_a_group(tmp_path):
    for seed, progress in ((0, True), (1, False)):
        cfg = _cfg(tmp_path, f"kd_seed{seed}", seed, progress=progress, device="cpu" if seed else "auto")
        (tmp_path / "runs" / cfg.name).mkdir(parents=True)
        write_run_report(tmp_path / "runs" / cfg.name, cfg, _result({"top1": 50.0 + seed}))
    rows = _rows(aggregate([tmp_path / "runs"]))
    assert len(rows) == 1 and rows[0][_column(aggregate([tmp_path / "runs"]), "run")] == "kd"


def test_unknown_metric_is_refused_with_did_you_mean(tmp_path, capsys):
    _run(tmp_path, "kd_s0")
    with pytest.raises(ValueError, match=r"'top11'.*did you mean 'top1'"):
        aggregate([tmp_path / "runs"], metric="top11")
    assert main(["report", str(tmp_path / "runs"), "--metric", "top11"]) == 2
    err = capsys.readouterr().err
    assert "top11" in err and "did you mean" in err and len(err.strip().splitlines()) == 1


def test_copied_run_folder_counts_once(tmp_path):
    run = _run(tmp_path, "kd_s0")
    _run(tmp_path, "kd_s1", seed=1)
    assert re.fullmatch(r"[0-9a-f]{12,}", json.loads((run / "summary.json").read_text())["run_id"])
    shutil.copytree(run, tmp_path / "runs" / "backup" / "kd_s0")
    table = aggregate([tmp_path / "runs"])
    assert _rows(table)[0][_column(table, "seeds")] == "2"
    assert "duplicate" in table


def test_copied_old_summary_counts_once(tmp_path):
    """Summaries written before run_id existed: identity from config.yaml, else from the summary's fields."""
    for seed in (0, 1):
        run = _run(tmp_path, f"kd_s{seed}", seed=seed)
        s = json.loads((run / "summary.json").read_text())
        for key in ("run_id", "config", "monitor"):
            s.pop(key, None)
        (run / "summary.json").write_text(json.dumps(s))
    shutil.copytree(tmp_path / "runs" / "kd_s0", tmp_path / "runs" / "copy_of_kd_s0")
    table = aggregate([tmp_path / "runs"])
    assert [r[_column(table, "seeds")] for r in _rows(table)] == ["2"]


def test_cut_off_summary_is_skipped_by_name(tmp_path, capsys):
    _run(tmp_path, "kd_s0")
    broken = tmp_path / "runs" / "crashed"
    broken.mkdir()
    (broken / "summary.json").write_text('{"name": "crashed", "metrics": {"top1": 4')
    with pytest.warns(UserWarning, match="crashed"):
        table = aggregate([tmp_path / "runs"])
    assert len(_rows(table)) == 1 and re.search(r"skipped 1 run", table, re.I) and "crashed" in table
    assert main(["report", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert "crashed" in captured.err and re.search(r"skipped 1 run", captured.out, re.I)


def test_table_mean_std_seeds_best_and_teacher_for_min_metric(tmp_path):
    for seed, fid in enumerate((30.0, 20.0, 25.0)):
        _run(tmp_path, f"gan_s{seed}", seed, metrics={"fid": fid, "is": 5.0 + seed},
             teacher_metrics={"fid": 12.5, "is": 8.0}, monitor="fid", mode="min")
    table = aggregate([tmp_path / "runs"])  # metric and mode from the runs' monitor
    (row,) = _rows(table)
    assert row[_column(table, "student fid")] == "25.00 ± 5.00"
    assert row[_column(table, "seeds")] == "3"
    assert row[_column(table, "best")] == "20.00" and "best (min)" in table
    assert row[_column(table, "teacher fid")] == "12.50"
    assert "mean ± std over seeds" in table
    # another metric of the same runs, higher is better unless said otherwise
    table = aggregate([tmp_path / "runs"], metric="is")
    assert _rows(table)[0][_column(table, "best")] == "7.000"
    # the CLI passes the mode through
    out = tmp_path / "t.md"
    assert main(["report", str(tmp_path / "runs"), "--metric", "is", "--mode", "min", "--out", str(out)]) == 0
    assert _rows(out.read_text())[0][_column(out.read_text(), "best")] == "5.000"


def test_loss_like_metrics_default_to_min(tmp_path):
    for seed, loss in enumerate((1.5, 1.25)):
        _run(tmp_path, f"kd_s{seed}", seed, metrics={"top1": 50.0, "loss": loss})
    table = aggregate([tmp_path / "runs"], metric="loss")
    assert "best (min)" in table and _rows(table)[0][_column(table, "best")] == "1.250"


def test_list_metric_cannot_be_aggregated(tmp_path):
    _run(tmp_path, "kd_s0", metrics={"top1": 50.0, "group_top1": [40.0, 60.0], "group_gap": 20.0})
    with pytest.raises(ValueError, match="group_top1.*list"):
        aggregate([tmp_path / "runs"], metric="group_top1")


def test_history_from_metrics_jsonl_nan_and_relogged_epoch(tmp_path):
    """metrics.jsonl writes NaN as 'nan' and a resumed run may log an epoch again: one row per epoch, NaN never best."""
    cfg = _cfg(tmp_path, "kd")
    run_dir = tmp_path / "kd"
    run_dir.mkdir()
    lines = [{"kind": "epoch", "epoch": 1, "lr": 0.1, "train_loss": 2.0, "val_top1": 30.0},
             {"kind": "step", "step": 5, "train_loss": 1.9},
             {"kind": "epoch", "epoch": 2, "lr": 0.1, "train_loss": 1.5, "val_top1": 20.0},
             {"kind": "epoch", "epoch": 2, "lr": 0.1, "train_loss": 1.4, "val_top1": 40.0},
             {"kind": "epoch", "epoch": 3, "lr": 0.1, "train_loss": "nan", "val_top1": "nan"}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = write_run_report(run_dir, cfg, _result({"top1": float("nan"), "loss": float("nan")})).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == {"name": "top1", "mode": "max", "best": 40.0, "best_epoch": 2}
    assert summary["metrics"]["top1"] == "nan"  # strict JSON: no bare NaN
    per_epoch = _rows(report.split("## Per epoch", 1)[1])
    assert [r[0] for r in per_epoch] == ["1", "2", "3"] and per_epoch[1][-1] == "40.00" and per_epoch[2][-1] == "nan"
