"""The latency harness and `kdforge bench`: pinned and restored threads, comparisons only at one thread count, a
table whose numbers come from the harness, and the CLI on a run folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import kdforge
import kdforge.deploy.bench as bench_module
from kdforge.cli import main
from kdforge.config import load_config
from kdforge.deploy.bench import EAGER, ORT, bench, count_macs
from kdforge.deploy.export import export
from kdforge.deploy.latency import (
    Backend,
    Latency,
    ThreadCountMismatch,
    eager_backend,
    measure,
    onnxruntime_backend,
    ratio,
)

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'kdforge[export]'")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def synthetic():
    """A RunConfig of 16 px generated images: the data and evaluator a bench scores with."""
    return load_config(None, ["data.name=synthetic", "data.synthetic_train=64", "data.batch_size=32",
                              "data.synthetic_test=64", "data.synthetic_size=16", "data.eval_batch_size=64"])


# --------------------------------------------------------------------------------------------- harness
def test_harness_pins_threads_warms_up_and_restores(single_thread):
    seen = []

    def prepare(threads):
        seen.append(("prepare", torch.get_num_threads()))
        return lambda inputs: seen.append(("call", torch.get_num_threads()))

    lat = measure(Backend("probe", prepare), torch.zeros(2, 3), batch_size=4, threads=2, warmup=2, repeats=5)
    assert torch.get_num_threads() == 1, "the caller's thread count must come back"
    assert seen[0] == ("prepare", 2) and seen[1:] == [("call", 2)] * 7  # 2 warm-up + 5 timed calls, all pinned
    assert lat.threads == 2 and lat.batch_size == 4 and len(lat.times_ms) == 5 and lat.warmup == 2
    q1, q3 = lat.quartiles_ms
    assert lat.min_ms <= q1 <= lat.median_ms <= q3 <= lat.max_ms
    assert lat.per_image_ms == pytest.approx(lat.median_ms / 4)


def test_batch_of_64_costs_more_than_batch_of_1_but_less_per_image(single_thread):
    model = tiny_cnn().eval()
    x = torch.randn(8, 3, 32, 32)
    one = measure(eager_backend(model), x, batch_size=1, threads=1, warmup=2, repeats=7)
    many = measure(eager_backend(model), x, batch_size=64, threads=1, warmup=2, repeats=7)
    assert many.median_ms > one.median_ms  # a batch of 64 takes longer than a batch of 1 ...
    assert many.images_per_s > one.images_per_s  # ... but less per image
    assert "ms/image" in str(one) and "1 thread" in str(one)


def test_comparing_different_thread_counts_is_refused(tmp_path, single_thread):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    path = export(model, x, tmp_path / "m.onnx", dynamic_batch=True).path
    ort1 = measure(onnxruntime_backend(path), x, threads=1, warmup=1, repeats=3)
    eager1 = measure(eager_backend(model), x, threads=1, warmup=1, repeats=3)
    eager2 = measure(eager_backend(model), x, threads=2, warmup=1, repeats=3)
    assert ratio(ort1, eager1) > 0
    with pytest.raises(ThreadCountMismatch, match="different thread counts"):
        ratio(ort1, eager2)
    with pytest.raises(ValueError):  # a kdforge user error: the CLI prints it as one line
        ratio(eager2, ort1)


def test_macs_are_half_the_counted_flops():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # 8 * 3 * 3 * 3 multiply-adds per output pixel
    assert count_macs(conv, (torch.randn(1, 3, 10, 10),)) == 8 * 27 * 100


# ----------------------------------------------------------------------------------------------- bench
def test_bench_table_rows_and_numbers_come_from_the_harness(tmp_path, monkeypatch, single_thread):
    calls: list[Latency] = []

    def recorded(*args, **kwargs):
        lat = measure(*args, **kwargs)
        calls.append(lat)
        return lat

    monkeypatch.setattr(bench_module, "measure", recorded)
    out = tmp_path / "results" / "deploy.md"
    result = bench([("tiny", tiny_cnn()), ("tiny2", tiny_cnn())], synthetic(), threads=1, out=out, int8=True,
                   warmup=1, repeats=3, batch_size=16)
    assert [r.label for r in result.rows] == ["tiny", "tiny (int8)", "tiny2", "tiny2 (int8)"]
    lines = out.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "params", "MACs", "ONNX", "eager CPU b1 (ms/img)", "eager CPU b16 (img/s)",
                      "ORT CPU b1 (ms/img)", "ORT CPU b16 (img/s)", *(["GPU b1 (ms/img)", "GPU b16 (img/s)"]
                                                                    if torch.cuda.is_available() else []),
                      "top-1 (%)", "ORT / eager (b1)"]
    assert len([ln for ln in lines if ln.startswith("| tiny")]) == 4
    row, int8 = result.rows[0], result.rows[1]
    # every latency of the table is one the harness measured, at the one thread count asked for
    measured = [lat for r in result.rows for lat in r.latency.values()]
    assert measured and all(any(lat is c for c in calls) for lat in measured)
    assert {lat.threads for lat in measured} == {1}
    assert set(row.latency) >= {f"{EAGER}@1", f"{EAGER}@16", f"{ORT}@1", f"{ORT}@16"}
    assert set(int8.latency) == {f"{ORT}@1", f"{ORT}@16"}
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[4] == f"{row.get(EAGER, 1).per_image_ms:.3f} ± {row.get(EAGER, 1).per_image_spread_ms:.3f}"
    assert cells[-1] == f"{row.ort_over_eager:.2f}x"
    assert row.params == sum(p.numel() for p in tiny_cnn().parameters()) and row.macs > 0
    assert row.export.passed and row.onnx_bytes == row.export.size_bytes
    assert 0 <= row.value <= 100 and row.metric == "top1" and 0 <= int8.value <= 100
    assert int8.onnx_bytes and result.plot == out.with_suffix(".png") and result.plot.stat().st_size > 0
    assert (tmp_path / "results" / "deploy_onnx" / "tiny.onnx").is_file()
    assert "half the interquartile range" in result.table and "FLOPs" in result.table


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A one-epoch run of a small student on 16 px generated images (a few seconds)."""
    root = tmp_path_factory.mktemp("bench_cli")
    recipe = {"name": "tiny", "out_dir": str(root / "runs"), "method": "scratch", "student": {"name": "wrn_16_1"},
              "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                       "batch_size": 32, "eval_batch_size": 32},
              "train": {"epochs": 1, "lr": 0.05, "progress": False}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    threads = torch.get_num_threads()
    assert main(["train", str(root / "tiny.yaml")]) == 0
    torch.set_num_threads(threads)
    return root / "runs" / "tiny"


def test_cli_bench_writes_the_table(run_folder, tmp_path, capsys, single_thread):
    out = tmp_path / "bench.md"
    code = main(["bench", str(run_folder), "--threads", "1", "--out", str(out), "--repeats", "3", "--warmup", "1",
                 "--batch-size", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "| tiny |" in out.read_text() and "| tiny |" in printed
    assert "synthetic (test split)" in out.read_text()  # scored on the run's own data
    assert out.with_suffix(".png").is_file()


def test_cli_bench_errors_are_one_line_with_exit_code_2(run_folder, tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdforge bench: error: no such run folder or checkpoint") and "\n" not in err
    assert main(["bench", str(run_folder), "--teacher", "resnet20"]) == 2
    assert "NAME=WEIGHTS" in capsys.readouterr().err
    assert main(["bench", str(run_folder), "--data", "cifar1O"]) == 2
    assert "did you mean 'cifar10'" in capsys.readouterr().err


def test_kdforge_bench_is_the_api():
    assert kdforge.bench is bench
