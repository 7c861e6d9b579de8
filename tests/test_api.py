"""The Python API and the CLI end to end: README example, recipes, run folders, eval, report, demo."""
from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

import kdforge
import kdforge.demo
from kdforge.cli import main
from kdforge.config import ConfigError, check_kwargs, default_shared_data, load_config
from kdforge.registry import DISTILLERS, MODELS

ROOT = Path(__file__).resolve().parents[1]
SHARED = default_shared_data()


def test_readme_adding_a_method_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    try:
        with redirect_stdout(io.StringIO()):
            exec(compile(code, "README.md", "exec"), ns)
        hist = ns["result"].history[-1]
        assert {"train_ce", "train_kd", "train_hint"} <= set(hist) and hist["train_hint"] > 0
    finally:
        DISTILLERS._items.pop("kd_plus_hint", None)


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), ns)
    printed = out.getvalue()
    assert "student top-1 after one epoch of KD" in printed
    # the last distillation trained the user's own Sequential, in place
    assert ns["result"].student is ns["mine"]
    acc = kdforge.evaluate(ns["mine"], ns["loader"])
    assert 0.0 <= acc["top1"] <= 100.0 and acc["top5"] >= acc["top1"]


def _tiny_recipe(tmp_path: Path, name: str = "tiny", seed: int = 0, method: dict | str = "kd") -> Path:
    recipe = {
        "name": name, "seed": seed, "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 256, "synthetic_test": 128, "batch_size": 64,
                 "eval_batch_size": 128},
        "teacher": {"name": "resnet20"}, "student": {"name": "wrn_16_1"},
        "method": method, "train": {"epochs": 2, "lr": 0.05, "progress": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_run_folder_eval_and_report(tmp_path, capsys):
    r0 = _tiny_recipe(tmp_path, "kd_s0", 0)
    r1 = _tiny_recipe(tmp_path, "kd_s1", 1)
    assert main(["distill", str(r0), "--no-teacher-eval"]) == 0
    assert main(["distill", str(r1), "--set", "train.log_every=7"]) == 0  # a run-only setting: still one group
    run = tmp_path / "runs" / "kd_s0"
    for f in ("config.yaml", "metrics.jsonl", "report.md", "curves.png", "samples.png", "summary.json",
              "checkpoints/last.pt"):
        assert (run / f).exists(), f
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("val_top1" in e for e in epochs)
    saved = load_config(run / "config.yaml")
    assert saved.student.kwargs["num_classes"] == 10 and saved.method.kwargs == {}
    assert load_config(tmp_path / "runs" / "kd_s1" / "config.yaml").train.log_every == 7
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['metrics']['top1']:.2f}" in (run / "report.md").read_text()

    # eval reproduces the run's final number from the checkpoint and its saved config
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoints" / "last.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(summary["metrics"]["top1"])

    # report aggregates the two seeds of one configuration: mean ± std
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    s1 = json.loads((tmp_path / "runs" / "kd_s1" / "summary.json").read_text())
    accs = [summary["metrics"]["top1"], s1["metrics"]["top1"]]
    mean = sum(accs) / 2
    std = float(torch.tensor(accs).std())
    assert f"{mean:.2f} ± {std:.2f} | 2 |" in table


def test_cli_errors_name_the_item(tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path)
    assert main(["distill", str(recipe), "--set", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "'lr'" in err
    assert main(["distill", str(recipe), "--set", "student.name=resnet57"]) == 2
    err = capsys.readouterr().err
    assert "resnet57" in err and "resnet56" in err
    assert main(["distill", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["distill", str(recipe), "--set", "method.temprature=2"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path, method="scratch")
    assert main(["train", str(recipe), "--set", "train.epochs=1"]) == 0
    assert main(["train", str(recipe), "--set", "train.epochs=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming a finished 1-epoch run with 2 epochs trains exactly one more epoch
    assert main(["train", str(recipe), "--set", "train.epochs=2", "--resume"]) == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_every_shipped_recipe_is_valid():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = load_config(path)
        MODELS.get(cfg.student.name)
        if cfg.teacher is not None:
            MODELS.get(cfg.teacher.name)
            assert cfg.teacher.weights, f"{path}: a teacher without weights"
        check_kwargs(DISTILLERS.get(cfg.method.name).__init__, cfg.method.kwargs, str(path))


def test_demo_quick(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        table = kdforge.demo.run_demo(tmp_path / "demo", quick=True, progress=False)
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher (scratch)", "student (scratch)",
                                                       "student + Hinton KD", "student + AT"]
    accs = [float(r.split("|")[4]) for r in rows]
    assert all(0.0 <= a <= 100.0 for a in accs)
    assert (tmp_path / "demo" / "report.md").read_text().count("| student") == 3
    # the KD runs loaded the demo teacher's own checkpoint
    cfg = load_config(tmp_path / "demo" / "student_kd" / "config.yaml")
    assert cfg.teacher.weights.endswith("teacher/checkpoints/last.pt")


def test_unknown_method_in_api():
    model = MODELS.build("resnet20")
    with pytest.raises(KeyError, match="'kdd'.*'kd'"):
        kdforge.distill(model, model, [], method="kdd")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").exists(), reason=f"shared CIFAR-10 not in {SHARED}")
def test_cifar10_recipe_two_steps(tmp_path, capsys):
    """The issue's CIFAR-10 recipe on the real data: prepares the cache, loads ResNet-56, runs 2 steps."""
    recipe = ROOT / "recipes/kd/cifar10/resnet20_from_resnet56.yaml"
    code = main(["distill", str(recipe), "--set", f"out_dir={tmp_path}", "--set", "train.epochs=2",
                 "--set", "train.max_steps=2", "--set", "data.val_subset=500", "--set", "train.progress=false"])
    assert code == 0
    teacher = json.loads((tmp_path / "kd_resnet20_from_resnet56" / "teacher_metrics.json").read_text())["metrics"]
    assert 75.0 < teacher["top1"] < 92.0  # ResNet-56 on the JPEG test images: about 83 %


def test_method_options_never_leak_into_training_settings():
    """A method option named like a training setting (here `gamma`) must reach the method, or be refused."""
    from kdforge.distillers.kd import HintonKD

    class GammaKD(HintonKD):
        def __init__(self, student, teacher, *, gamma: float = 1.0):
            super().__init__(student, teacher)
            self.gamma_seen = gamma

    DISTILLERS.register("_gamma_kd_test")(GammaKD)
    try:
        from kdforge.data import BatchLoader, make_synthetic

        loader = BatchLoader(make_synthetic(64, 8, size=16)["train"], 32)
        s, t = MODELS.build("resnet20"), MODELS.build("resnet20")
        with pytest.raises(ConfigError, match="gamma"):
            kdforge.distill(s, t, loader, method="_gamma_kd_test", gamma=0.3, max_steps=1, progress=False)
        res = kdforge.distill(s, t, loader, method="_gamma_kd_test", method_options={"gamma": 0.3}, max_steps=1,
                              progress=False)
        assert res.distiller.gamma_seen == 0.3
    finally:
        DISTILLERS._items.pop("_gamma_kd_test")


def test_tensorboard_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from kdforge.engine.logging import MetricsLogger

    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-resnets").exists(), reason=f"shared ResNet weights not in {SHARED}")
@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").exists(), reason=f"shared CIFAR-10 not in {SHARED}")
def test_eval_a_published_state_dict(capsys):
    """`kdforge eval` on a file kdforge did not write: the akamaster ResNet-20 (module.-prefixed state dict)."""
    weights = next((SHARED / "cifar10-resnets").glob("resnet20-*.th"))
    recipe = ROOT / "recipes/train/cifar10/resnet20.yaml"
    capsys.readouterr()
    assert main(["eval", str(weights), "--recipe", str(recipe), "--set", "data.val_subset=1000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 72.0 < out["top1"] < 90.0  # ResNet-20 on the JPEG test images: about 81 %


def test_cli_run_stopped_then_resumed_matches_an_unbroken_run(tmp_path):
    """Through the CLI: a run stopped mid-epoch (max_steps) and continued with --resume ends with the same
    weights, bit for bit, as the same recipe run without a break."""
    recipe = _tiny_recipe(tmp_path, "broken")
    common = ["--no-teacher-eval", "--set", "train.checkpoint_every=2"]
    assert main(["distill", str(recipe), *common, "--set", "train.max_steps=3"]) == 0
    assert main(["distill", str(recipe), *common, "--resume"]) == 0
    assert main(["distill", str(recipe), *common, "--set", "name=unbroken"]) == 0
    a = torch.load(tmp_path / "runs/broken/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs/unbroken/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ API misuse, named
def test_api_names_model_mistakes_before_training(synth):
    from kdforge.data import BatchLoader

    loader = BatchLoader(synth["train"], 16, drop_last=True)
    with pytest.raises(TypeError, match="float64.*student.float\\(\\)"):
        kdforge.distill(MODELS.build("resnet20").double(), None, loader, method="scratch", epochs=1, progress=False)
    with pytest.raises(ValueError, match="4 outputs but the data has 10 classes.*num_classes=10"):
        kdforge.distill(MODELS.build("resnet20", num_classes=4), None, loader, method="scratch", epochs=1,
                        progress=False)
    with pytest.raises(ValueError, match="no samples"):
        kdforge.evaluate(MODELS.build("resnet20"), [])


def test_cli_keeps_tracebacks_for_bugs_and_one_line_for_user_errors(monkeypatch, capsys):
    import kdforge.cli as cli

    def buggy(_args):
        raise AttributeError("'NoneType' object has no attribute 'x'")  # a bug, not a user error

    monkeypatch.setattr(cli, "cmd_list", buggy)
    with pytest.raises(AttributeError):
        cli.main(["list"])

    def user_error(_args):
        raise FileNotFoundError("recipe not found: nope.yaml")

    monkeypatch.setattr(cli, "cmd_list", user_error)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err.strip() == "kdforge list: error: recipe not found: nope.yaml"
