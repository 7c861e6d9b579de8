"""kdforge.export: every registered model round-trips through ONNX (and a few through TorchScript and
torch.export), the files run without kdforge, failures name what failed, and `kdforge export` on a run folder."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import kdforge
from kdforge.cli import main
from kdforge.deploy.diagnose import ExportError
from kdforge.deploy.export import export
from kdforge.deploy.parity import compare, flatten_outputs
from kdforge.deploy.sources import input_shapes
from kdforge.models import MODELS, build_model

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'kdforge[export]'")


def _build(name: str) -> nn.Module:
    """A registered model with 10 classes where it classifies (the 32 px stem where the factory offers one), or
    a torchvision one by name; seeded, so a failure reproduces."""
    torch.manual_seed(0)
    kw = {"num_classes": 10}
    if "small_input" in inspect.signature(MODELS.get(name)).parameters:
        kw["small_input"] = True
    return build_model(name, **kw)


def _example(model: nn.Module, n: int = 2) -> tuple[torch.Tensor, ...]:
    """One tensor per input the model takes (kdforge.deploy.sources.input_shapes: latent codes for a generator,
    else 32 px images, two for an energy net, an image and its condition for a conditional discriminator)."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(n, *shape, generator=g) for shape in input_shapes(model))


# the deeper CIFAR ResNets are resnet20's code with more blocks: they add export time (up to 7 s each), not cover
SAME_CODE_AS_RESNET20 = {"resnet32", "resnet44", "resnet56", "resnet110"}
MODEL_NAMES = [*(n for n in MODELS.names() if n not in SAME_CODE_AS_RESNET20), "torchvision:resnet18"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_round_trips_through_onnx_with_a_dynamic_batch(name, tmp_path, single_thread):
    model = _build(name).train()
    result = export(model, _example(model), tmp_path / "m.onnx", dynamic_batch=True)
    assert result.passed, result.summary()
    assert result.batch_sizes == (1, 2, 7) and result.max_abs_diff <= result.tolerance
    assert result.exporter in ("dynamo", "legacy") and result.opset and result.size_bytes > 1000
    assert (tmp_path / "m.onnx").is_file() and not list(tmp_path.glob(".*tmp")), "scratch files left behind"
    assert model.training, "the model's train/eval state must be restored"


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "mfd_cnn", "mosaic_generator"])
@pytest.mark.parametrize("fmt", ["torchscript", "torch.export"])
def test_torchscript_and_torch_export_round_trips(name, fmt, tmp_path, single_thread):
    model = _build(name)
    result = export(model, _example(model), tmp_path / "m.bin", format=fmt, dynamic_batch=True)
    assert result.passed and result.batch_sizes == (1, 2, 7), result.summary()
    assert result.exporter == ("trace" if fmt == "torchscript" else "torch.export")


class TwoHeads(nn.Module):
    """Outputs in a dict of a tensor and a tuple: every format must give all three back, flattened alike."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.a(h), "extra": (self.b(h), h.mean(1))}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch.export"])
def test_several_outputs_are_all_compared(fmt, tmp_path, single_thread):
    result = export(TwoHeads(), torch.randn(3, 3, 8, 8), tmp_path / "m", format=fmt, dynamic_batch=True)
    assert result.passed, result.summary()


def test_parity_compares_every_output_within_the_stated_tolerance():
    ref = flatten_outputs({"a": torch.tensor([10.0, -2.0]), "b": (torch.zeros(2), 3)})
    assert len(ref) == 3
    ok = compare(ref, [r + 5e-4 for r in ref])  # tolerance 1e-4 + 1e-4 * 10 = 1.1e-3
    assert ok.passed and ok.tolerance == pytest.approx(1.1e-3)
    assert not compare(ref, [ref[0] + 2e-3, ref[1], ref[2]]).passed
    assert "shape" in compare(ref, [ref[0][:1], ref[1], ref[2]]).detail
    assert "2 outputs" in compare(ref, ref[:2]).detail


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)  # exports fine, but no file can reproduce torch's random numbers


def test_a_file_whose_outputs_differ_is_reported_not_hidden(tmp_path, single_thread):
    result = export(Noisy(), torch.zeros(4, 3), tmp_path / "m.onnx", dynamic_batch=True)
    assert result.passed is False and "DIFFER" in result.summary()
    assert result.exporter == "dynamo" and [f.split(":")[0] for f in result.fallbacks] == ["dynamo", "legacy"]
    assert (tmp_path / "m.onnx").is_file() and not list(tmp_path.glob(".*tmp"))


def test_flags_are_restored_exactly(tmp_path, single_thread):
    model = _build("wrn_16_1").train()
    model.layer1.eval()  # a frozen part stays frozen, the rest stays in training mode
    export(model, _example(model), tmp_path / "m.pt", format="torchscript")
    assert model.training and model.layer2.training and all(not m.training for m in model.layer1.modules())


# ------------------------------------------------------------------------------------ unexportable models
class Eigen(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x.view(-1, 2, 2)).real  # no ONNX exporter has linalg_eig


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a Python `if` on a tensor's value
            return x * 2
        return -x


class Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4, bias=False)  # odd: a negated input flips the sign of what `inner` sees
        self.body = nn.Sequential(nn.Identity(), inner)

    def forward(self, x):
        return self.body(self.stem(x))


def test_an_operator_onnx_lacks_is_named_with_its_module_and_the_formats_that_work(tmp_path):
    with pytest.raises(ExportError) as info:
        export(Net(Eigen()), torch.randn(3, 4), tmp_path / "m.onnx")
    e = info.value
    assert "linalg_eig" in str(e) and e.operator and "linalg_eig" in e.operator
    assert e.module == "body.1" and "'body.1'" in str(e)
    assert "test_export.py" in e.location
    assert set(e.alternatives) == {"torchscript", "torch.export"} and "--format torchscript" in str(e)
    assert "\n" not in str(e)  # one line, as the CLI prints it
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.iterdir())


def test_data_dependent_control_flow_names_the_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export(Net(Branchy()), torch.randn(3, 4), tmp_path / "m.pt2", format="torch.export")
    msg = str(info.value)
    assert "data-dependent control flow" in msg and "if x.sum() > 0" in msg and "'body.1'" in msg
    assert info.value.alternatives == ("torchscript",)
    # the ONNX exporters fail too (the legacy one would trace one branch: a warning, made an error here)
    with pytest.raises(ExportError, match="legacy TorchScript-based ONNX exporter"):
        export(Net(Branchy()), torch.randn(3, 4), tmp_path / "m.onnx")
    # TorchScript: the trace keeps one branch (it differs from eager on the negated input), so the model is
    # scripted instead, with the `if`
    result = export(Net(Branchy()), torch.randn(3, 4), tmp_path / "m.pt", format="torchscript", dynamic_batch=True)
    assert result.exporter == "script" and result.passed and "trace" in result.fallbacks[0]


class ShapeGuard(nn.Module):
    def forward(self, t, s):
        if t.shape != s.shape:  # the tracer warns here too, but the branch depends on shapes only
            raise ValueError("t and s must have one shape")
        return t * s


def test_a_tracer_warning_on_a_shape_check_is_checked_not_refused(tmp_path):
    x = torch.randn(3, 4)
    result = export(ShapeGuard(), (x, x + 1), tmp_path / "m.pt", format="torchscript", dynamic_batch=True)
    assert result.exporter == "trace" and result.passed
    assert "negated and on random inputs" in result.notes[0] and "t.shape != s.shape" in result.summary()


def test_a_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'kdforge\[export\]'"):
        export(Net(nn.Identity()), torch.randn(2, 4), tmp_path / "m.onnx")


def test_import_kdforge_does_not_import_onnx():
    code = ("import sys, kdforge; assert callable(kdforge.export) and callable(kdforge.bench); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- files run without kdforge
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import torch

    folder = sys.argv[1]
    x = np.load(folder + "/x.npy")
    session = ort.InferenceSession(folder + "/m.onnx", providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    ts_out = torch.jit.load(folder + "/m.pt")(torch.from_numpy(x)).detach().numpy()
    assert "kdforge" not in sys.modules, "the child imported kdforge"
    print(json.dumps({"onnx": onnx_out.tolist(), "torchscript": ts_out.tolist()}))
""")


def test_exported_files_run_in_a_fresh_process_without_kdforge(tmp_path, single_thread):
    model = _build("resnet20")
    export(model, _example(model), tmp_path / "m.onnx", dynamic_batch=True)
    export(model, _example(model), tmp_path / "m.pt", format="torchscript")
    (x,) = _example(model, 5)  # another batch size than the export's
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ref = model.eval()(x)
    for fmt in ("onnx", "torchscript"):
        p = compare([ref], [np.array(got[fmt], dtype=np.float32)])
        assert p.passed, f"{fmt}: {p.detail}"


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """Two steps of DFAD (a student and a generator) with small networks, scored on 32 px generated images."""
    root = tmp_path_factory.mktemp("export_cli")
    recipe = {"name": "tiny", "out_dir": str(root / "runs"), "teacher": {"name": "wrn_16_1"},
              "student": {"name": "wrn_16_1"},
              "method": {"name": "dfad", "student_steps": 1, "generator": "mosaic_generator",
                         "generator_options": {"layout": "paper", "z_dim": 32}},
              "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "data_free_steps": 2,
                       "batch_size": 16, "eval_batch_size": 32},
              "train": {"epochs": 1, "lr": 0.05, "progress": False}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    threads = torch.get_num_threads()
    assert main(["distill", str(root / "tiny.yaml"), "--no-teacher-eval"]) == 0
    torch.set_num_threads(threads)
    return root / "runs" / "tiny"


def test_cli_export_checks_on_real_test_images(run_folder, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    assert main(["export", str(run_folder), "--dynamic-batch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "real test images of synthetic" in printed and "outputs match at batch 1, 7, 8" in printed
    assert str(out) in printed and out.is_file()
    assert main(["export", str(run_folder / "checkpoints" / "last.pt"), "--format", "torch.export",
                 "--out", str(tmp_path / "s.pt2")]) == 0
    assert "torch.export.export" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cli_exports_another_network_of_the_run(run_folder, tmp_path, capsys):
    out = tmp_path / "generator.pt"
    assert main(["export", str(run_folder), "--network", "generator", "--format", "torchscript",
                 "--dynamic-batch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the generator of" in printed and "random latent codes" in printed and "outputs match" in printed
    assert torch.jit.load(str(out))(torch.randn(3, 32)).shape == (3, 3, 32, 32)
    assert main(["export", str(run_folder), "--network", "critic"]) == 2
    assert "holds no network 'critic'" in capsys.readouterr().err


def test_cli_export_errors_are_one_line_with_exit_code_2(run_folder, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdforge export: error: no such run folder or checkpoint") and "\n" not in err
    assert main(["export", str(tmp_path)]) == 2  # a folder that is not a run
    assert "not a kdforge run folder" in capsys.readouterr().err
    assert main(["export", str(run_folder), "--format", "torchscript", "--opset", "17"]) == 2
    assert "--opset is an ONNX setting" in capsys.readouterr().err


def test_kdforge_export_is_the_api():
    assert kdforge.export is export
