"""`kdforge sweep` and `kdforge report --select`: grid expansion and run names, checks before anything runs, a
real tiny sweep (two runs at once, skipped when finished, a failed run reported while the others finish), the
best row by the mean of a named metric, and an Optuna search that resumes from its SQLite study."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdforge.cli import main
from kdforge.config import load_config, parse_override
from kdforge.report import aggregate, write_run_report
from kdforge.report.common import strip_seed
from kdforge.sweep import expand_grid, parse_grid, parse_seeds, parse_space, plan_run, run_name, to_yaml


def _recipe(tmp_path: Path) -> Path:
    """A recipe that trains resnet20 from scratch for two steps on tiny synthetic images (a few seconds a run)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 32, "synthetic_test": 16, "synthetic_size": 8,
                 "root": str(tmp_path / "cache"), "batch_size": 16, "crop_pad": 0, "flip": False},
        "student": "resnet20", "method": {"name": "scratch"},
        "train": {"epochs": 1, "device": "cpu", "progress": False, "log_every": 1}}))
    return recipe


def _sweep(recipe: Path, *args: str) -> int:
    return main(["sweep", str(recipe), "--verb", "train", "--threads", "1", *args])


def _means(folder: Path, metric: str) -> dict[str, float]:
    """Run name without its seed -> the mean of `metric` over its seeds, read from the summary.json files."""
    values: dict[str, list[float]] = {}
    for path in folder.glob("*/summary.json"):
        s = json.loads(path.read_text())
        values.setdefault(strip_seed(s["name"]), []).append(s["metrics"][metric])
    return {name: statistics.fmean(v) for name, v in values.items()}


# ------------------------------------------------------------------------------------------ pure functions
def test_the_grid_is_the_product_of_values_parsed_as_set_parses_them():
    grid = parse_grid(["method.temperature=2,4", "train.lr=0.1,0.001", "data.mean=[0.5,0.5,0.5],[0.4,0.4,0.4]",
                       "student.name=resnet20"])
    assert grid["method.temperature"] == [2, 4] and grid["train.lr"] == [0.1, 0.001]
    assert grid["data.mean"] == [[0.5, 0.5, 0.5], [0.4, 0.4, 0.4]]  # brackets keep a list whole
    points = expand_grid(grid)
    assert len(points) == 8 and points[0] == {"method.temperature": 2, "train.lr": 0.1, "data.mean": [0.5] * 3,
                                               "student.name": "resnet20"}
    assert points[-1]["method.temperature"] == 4 and points[1]["data.mean"] == [0.4] * 3  # first key slowest
    assert expand_grid({}) == [{}]  # seeds only
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for value in (1e-05, 0.1, 3, "1e-4", None, True, [0.5, 0.5], "a: b", "/tmp/x y"):
        assert parse_override(f"k={to_yaml(value)}")[1] == value  # what a run is given is what the grid said


def test_run_names_are_readable_unique_and_safe_for_folders():
    assert run_name("mfd", {"method.mfd_weight": 3}, 0) == "mfd_mfd_weight3_s0"
    assert run_name("kd", {"train.lr": 0.05, "method.temperature": 4}, 2) == "kd_lr0.05_temperature4_s2"
    assert run_name("kd", {"student.name": "resnet20"}, 0) == "kd_name-resnet20_s0"
    assert run_name("kd", {}, 1) == "kd_s1"
    assert strip_seed(run_name("kd", {"train.lr": 0.1}, 7)) == "kd_lr0.1"  # the report's row label
    # two keys ending alike keep their section; lossy spellings (a path, an Optuna float) get a hash of the point
    assert run_name("x", {"train.lr": 0.1, "method.lr": 0.2}, 0) == "x_train.lr0.1_method.lr0.2_s0"
    odd = [run_name("x", {"student.name": v}, 0) for v in ("torchvision:resnet18", "torchvision/resnet18")]
    optuna = [run_name("x", {"train.lr": v}, 0) for v in (0.0123456789, 0.0123456788)]
    for name in odd + optuna:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and len(name) < 130
    assert len(set(odd)) == 2 and len(set(optuna)) == 2 and optuna[0].startswith("x_lr0.01235_")
    names = [run_name("kd", p, s) for p in expand_grid(parse_grid(["train.lr=0.1,0.01", "method.temperature=1,4"]))
             for s in (0, 1)]
    assert len(set(names)) == 8


def test_bad_grid_seeds_and_space_fail_naming_the_item():
    for items, part in ((["train.lr"], "'train.lr'"), (["train.lr=0.1,"], "train.lr=0.1,"),
                        (["train.lr=0.1,0.10"], "lists 0.1 twice"), (["a=1", "a=2"], "given twice")):
        with pytest.raises(ValueError, match=re.escape(part)):
            parse_grid(items)
    with pytest.raises(ValueError, match="'0,x'"):
        parse_seeds("0,x")
    space = parse_space(["train.lr=1e-3:1e-1:log", "train.epochs=int:1:3", "method.temperature=2,4"])
    assert (space["train.lr"].kind, space["train.lr"].log, space["train.lr"].low) == ("float", True, 1e-3)
    assert (space["train.epochs"].kind, space["train.epochs"].high) == ("int", 3)
    assert space["method.temperature"].choices == (2, 4)
    for item in ("train.lr=0.1:x", "train.lr=0.2:0.1", "train.lr=0:1:log", "train.lr"):
        with pytest.raises(ValueError, match=re.escape(item)):
            parse_space([item])


def test_unknown_keys_fail_before_anything_runs_naming_the_key(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert _sweep(recipe, "--grid", "train.lr=0.1,0.2", "--grid", "train.lrr=0.1", "--seeds", "0,1") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "did you mean 'lr'" in err
    # options the loader passes through (method.x, student.x) are checked against the method or model
    assert main(["sweep", str(recipe), "--set", "method=kd", "--grid", "method.temprature=2,4"]) == 2
    assert "unknown option 'temprature'" in capsys.readouterr().err
    assert _sweep(recipe, "--grid", "train.lr=0.1", "--trials", "2") == 2
    assert "--trials and --space belong to --search optuna" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_decides_whether_a_run_starts_resumes_or_is_skipped(tmp_path):
    recipe = _recipe(tmp_path)
    folder = tmp_path / "runs" / "tiny_sweep"

    def action(**point):
        return plan_run(recipe, [], "tiny", folder, point, 0).action

    assert action(**{"train.lr": 0.1}) == "run"
    run_dir = folder / "tiny_lr0.1_s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert action(**{"train.lr": 0.1}) == "resume"  # interrupted: `--resume` continues it
    config = load_config(recipe, ["train.lr=0.1", "name=tiny_lr0.1_s0"]).to_dict()
    (run_dir / "summary.json").write_text(json.dumps({"metrics": {}, "config": config}))
    assert action(**{"train.lr": 0.1}) == "done"
    assert plan_run(recipe, ["train.epochs=3"], "tiny", folder, {"train.lr": 0.1}, 0).action == "resume"
    with pytest.raises(ValueError, match="finished run with other settings.*train.momentum"):
        plan_run(recipe, ["train.momentum=0.5"], "tiny", folder, {"train.lr": 0.1}, 0)


# ------------------------------------------------------------------------------------------ report --select
def _fake_run(tmp_path: Path, name: str, seed: int, metrics: dict) -> None:
    cfg = load_config(None, base={"name": f"{name}_s{seed}", "seed": seed, "out_dir": str(tmp_path / "runs"),
                                  "student": "resnet20", "method": {"name": "scratch", "tag": name},
                                  "train": {"progress": False}})
    run_dir = tmp_path / "runs" / cfg.name
    run_dir.mkdir(parents=True)
    write_run_report(run_dir, cfg, SimpleNamespace(metrics=metrics, teacher_metrics=None, history=[]))


def test_report_select_marks_the_row_with_the_best_mean_of_another_metric(tmp_path):
    # a: best top1, worst mean deo_m; b: the lowest mean deo_m although its seed 1 is the worst single value
    for name, seed, top1, deo_m in (("a", 0, 90.0, 9.0), ("a", 1, 91.0, 8.0), ("b", 0, 80.0, 1.0),
                                    ("b", 1, 81.0, 9.5), ("c", 0, 85.0, 6.0), ("c", 1, 86.0, 6.0)):
        _fake_run(tmp_path, name, seed, {"top1": top1, "deo_m": deo_m})
    plain = aggregate([tmp_path / "runs"], metric="top1")
    assert "Selected" not in plain and "**" not in plain
    table = aggregate([tmp_path / "runs"], metric="top1", select="deo_m", select_mode="min")
    assert "| **b** |" in table and "deo_m (mean, min)" in table
    assert "Selected: b (scratch, resnet20 on synthetic): the lowest mean deo_m over its seeds, 5.250." in table
    assert "Selected: a " in aggregate([tmp_path / "runs"], metric="deo_m", mode="min", select="top1")
    with pytest.raises(ValueError, match="unknown metric 'deo_n'.*deo_m"):
        aggregate([tmp_path / "runs"], select="deo_n")


# ------------------------------------------------------------------------------------------ real runs
def test_a_tiny_sweep_runs_two_at_once_skips_finished_runs_and_selects_by_mean(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    folder = tmp_path / "runs" / "tiny_sweep"
    assert _sweep(recipe, "--grid", "train.lr=0.01,0.2", "--seeds", "0,1", "--jobs", "2", "--metric", "top1",
                  "--select", "loss", "--select-mode", "min") == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["tiny_lr0.01_s0", "tiny_lr0.01_s1", "tiny_lr0.2_s0", "tiny_lr0.2_s1"]
    for name in names:
        summary = json.loads((folder / name / "summary.json").read_text())
        lr, seed = (0.01 if "0.01" in name else 0.2), int(name[-1])
        assert (summary["config"]["train"]["lr"], summary["seed"]) == (lr, seed)
        assert "==> " in (folder / name / "sweep.log").read_text()  # the run's output went to its log
    means = _means(folder, "loss")
    best = min(means, key=means.get)
    assert f"Selected: {best} " in out and "2 at a time" in out
    assert out.count("| synthetic |") == 2  # one row per grid point, mean over its two seeds

    stamps = {n: (folder / n / "summary.json").stat().st_mtime_ns for n in names}
    assert _sweep(recipe, "--grid", "train.lr=0.01,0.2", "--seeds", "0,1", "--jobs", "2") == 0
    assert "4 finished already, 0 to run (0 resumed)" in capsys.readouterr().out
    assert stamps == {n: (folder / n / "summary.json").stat().st_mtime_ns for n in names}

    means = _means(folder, "top1")  # ties (16 test images) go to the first row in table order
    assert main(["report", str(folder), "--metric", "loss", "--select", "top1"]) == 0  # max: top1's own mode
    assert f"Selected: {max(sorted(means), key=means.get)} " in capsys.readouterr().out


def test_a_failed_run_is_reported_while_the_others_finish(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert _sweep(recipe, "--grid", "student.name=resnet20,no_such_net", "--seeds", "0", "--jobs", "2") == 1
    captured = capsys.readouterr()
    assert "tiny_name-no_such_net_s0: FAILED (exit code 2)" in captured.out
    assert "unknown model 'no_such_net'" in captured.out  # the end of its log
    assert "1 run failed: tiny_name-no_such_net_s0" in captured.err
    assert (tmp_path / "runs" / "tiny_sweep" / "tiny_name-resnet20_s0" / "summary.json").is_file()
    assert "| tiny_name-resnet20 |" in captured.out  # the table of what finished


def test_an_optuna_search_resumes_from_its_study(tmp_path, capsys):
    optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install 'kdforge[sweep]')")
    recipe = _recipe(tmp_path)
    folder = tmp_path / "search"
    args = ["--search", "optuna", "--metric", "loss", "--space", "train.lr=0.01:0.3:log", "--seeds", "0",
            "--jobs", "2", "--out-dir", str(folder)]
    assert _sweep(recipe, *args, "--trials", "2") == 0
    assert "0 complete already, 2 to run" in capsys.readouterr().out
    assert len(list(folder.glob("*/summary.json"))) == 2
    assert _sweep(recipe, *args, "--trials", "3") == 0
    out = capsys.readouterr().out
    assert "2 complete already, 1 to run" in out and "best trial: #" in out
    runs = list(folder.glob("*/summary.json"))
    assert len(runs) == 3
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'optuna.db'}")
    values = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert values == pytest.approx(sorted(json.loads(p.read_text())["metrics"]["loss"] for p in runs))


def test_a_sweep_run_folder_can_be_replaced_by_hand_keeping_its_log(tmp_path):
    from kdforge.engine.run_folder import SWEEP_LOG, open_run_folder

    open_run_folder(tmp_path, "r", resume=False, overwrite=False).close()  # as the sweep marks it before a run
    (tmp_path / "r" / SWEEP_LOG).write_text("attempt 1\n")
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    open_run_folder(tmp_path, "r", resume=False, overwrite=True).close()  # `kdforge distill --overwrite`
    assert (tmp_path / "r" / SWEEP_LOG).read_text() == "attempt 1\n" and not (tmp_path / "r" / "metrics.jsonl").exists()
