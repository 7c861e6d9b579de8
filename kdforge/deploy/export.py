"""Export a trained network to ONNX, TorchScript or torch.export's .pt2, then load the file back and check that
it computes what the eager model computes.

    result = kdforge.export(student, images[:8], "student.onnx", dynamic_batch=True)
    result.exporter, result.passed, result.max_abs_diff   # "dynamo", True, 3.1e-06

Which exporter, per format, in the order tried (a later one only when the earlier one raises, or exports a file
whose outputs do not match):
  onnx          the torch.export-based exporter (`torch.onnx.export(dynamo=True)`, needs onnxscript), then the
                legacy TorchScript-based one (`dynamo=False`); the file is checked with onnx.checker and run
                with ONNX Runtime on the CPU.
  torchscript   `torch.jit.trace` (any module of plain tensor code, dict outputs too), then `torch.jit.script`
                when the trace would branch on a tensor's value (the trace keeps one branch; a script keeps
                the `if`).
  torch.export  `torch.export.export`, saved with torch.export.save and loaded with torch.export.load.
Tracing exporters only warn when a Python `if` turns a tensor into a bool, and the file then computes the branch
the example took. Harmless for a shape check, wrong for a branch on values: here the file is then also run on
negated and on random inputs, and refused when it differs from eager on them. With `dynamic_batch` the batch
dimension is symbolic and the check runs at batch sizes 1 and 7 as well as the example's.

The model is exported in eval mode and its modules' train/eval flags are restored afterwards.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.deploy._optional import require
from kdforge.deploy.diagnose import (
    FORMATS,
    ExportError,  # noqa: F401  (re-exported: callers catch it from here)
    Failure,
    TraceDependsOnValues,
    export_error,
    read_failure,
    value_branch,
)
from kdforge.deploy.parity import ATOL, RTOL, Parity, as_inputs, compare, flatten_outputs, with_batch

CHECK_BATCHES = (1, 7)  # batch sizes a dynamic-batch artefact is checked at, besides the example's
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "torch.export": ".pt2"}
EXPORTER_NAMES = {"dynamo": "the torch.export-based ONNX exporter", "legacy": "the legacy TorchScript-based ONNX "
                  "exporter", "trace": "torch.jit.trace", "script": "torch.jit.script",
                  "torch.export": "torch.export.export"}


@dataclass
class ExportResult:
    path: Path
    format: str  # onnx | torchscript | torch.export
    exporter: str  # onnx: dynamo | legacy; torchscript: trace | script; torch.export: torch.export
    passed: bool | None  # outputs within tolerance at every checked batch size; None when not checked
    max_abs_diff: float | None  # the largest |artefact - eager| over outputs and batch sizes
    tolerance: float | None  # atol + rtol * max|eager output| (the largest over the checked batches)
    size_bytes: int  # the file (and an ONNX file's external data, if any)
    batch_sizes: tuple[int, ...] = ()  # where the outputs were compared
    dynamic_batch: bool = False
    opset: int | None = None  # ONNX only: the default-domain opset of the file
    fallbacks: list[str] = field(default_factory=list)  # why an earlier exporter was not used
    detail: str = ""  # why the check failed, when it did
    notes: list[str] = field(default_factory=list)  # what the user should know (a tracer's warning, checked)

    def summary(self) -> str:
        """One line: the file, the exporter, the parity check."""
        how = EXPORTER_NAMES.get(self.exporter, self.exporter) + (f", opset {self.opset}" if self.opset else "")
        if self.passed is None:
            check = "outputs not checked"
        else:
            verdict = "match" if self.passed else "DIFFER"
            check = (f"outputs {verdict} at batch {', '.join(map(str, self.batch_sizes))}: max |diff| "
                     f"{self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e})")
            if self.detail:
                check += f"; {self.detail}"
        notes = "".join(f"; note: {n}" for n in self.notes)
        return f"{self.path} ({self.format}, {how}, {_size(self.size_bytes)}): {check}{notes}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------- exporters
@contextlib.contextmanager
def _silent_fds() -> Iterator[None]:
    """File descriptors 1 and 2 into a scratch file: the legacy exporter's C++ side prints the whole graph to
    stderr when it fails, which no Python-level redirect catches. KDFORGE_DEBUG=1 lets it through."""
    if os.environ.get("KDFORGE_DEBUG"):
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Exporters print graph dumps, progress and deprecation notices (torch.jit is deprecated in favour of
    torch.export, and used here knowingly); keep them out of the user's terminal and hand back the warnings (a
    TracerWarning may mean the file is wrong)."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink), _silent_fds():
            warnings.simplefilter("always")
            yield caught
    finally:
        torch_log.setLevel(level)


def _batch_dim(dynamic: bool) -> Any:
    return torch.export.Dim("batch") if dynamic else None


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], dynamic: bool) -> Any:
    if not dynamic:
        return None
    batch = _batch_dim(True)
    return tuple({0: batch} for _ in inputs)


def _onnx_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *, dynamic: bool,
                 opset: int | None, outputs: list[torch.Tensor]) -> TraceDependsOnValues | None:
    require("onnxscript", "the torch.export-based ONNX exporter")
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    with _quiet():
        torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(inputs, dynamic),
                          external_data=False, verbose=False, **kwargs)
    return None


def _onnx_legacy(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *, dynamic: bool,
                 opset: int | None, outputs: list[torch.Tensor]) -> TraceDependsOnValues | None:
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    axes = None
    if dynamic:  # the outputs whose first dimension is the batch are dynamic too
        n = inputs[0].shape[0]
        axes = {name: {0: "batch"} for name in in_names}
        axes.update({name: {0: "batch"} for name, o in zip(out_names, outputs) if o.dim() and o.shape[0] == n})
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    with _quiet() as caught:
        torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=in_names, output_names=out_names,
                          dynamic_axes=axes, **kwargs)
    return value_branch(caught)


def _ts_trace(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, **_: Any) -> TraceDependsOnValues | None:
    with _quiet() as caught:
        traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
    return value_branch(caught)


def _ts_script(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, **_: Any) -> None:
    with _quiet():
        torch.jit.save(torch.jit.script(model), str(path))
    return None


def _torch_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *, dynamic: bool,
                  **_: Any) -> None:
    with _quiet():
        program = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic))
        torch.export.save(program, str(path))
    return None


Exporter = Callable[..., "TraceDependsOnValues | None"]  # writes the file; a tracer's bool warning, if any
EXPORTERS: dict[str, list[tuple[str, Exporter]]] = {
    "onnx": [("dynamo", _onnx_dynamo), ("legacy", _onnx_legacy)],
    "torchscript": [("trace", _ts_trace), ("script", _ts_script)],
    "torch.export": [("torch.export", _torch_export)],
}


# ------------------------------------------------------------------------------------------------ loaders
def _onnx_runner(path: Path) -> Callable[[tuple[torch.Tensor, ...]], list[Any]]:
    from kdforge.deploy.runtime import ort_session, run_session

    onnx = require("onnx", "checking an ONNX file")
    onnx.checker.check_model(str(path))  # by path: also reads external data, if the exporter wrote some
    session = ort_session(path)
    return lambda inputs: run_session(session, inputs)


def _torchscript_runner(path: Path) -> Callable[[tuple[torch.Tensor, ...]], list[Any]]:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda inputs: flatten_outputs(loaded(*(x.cpu() for x in inputs)))


def _torch_export_runner(path: Path) -> Callable[[tuple[torch.Tensor, ...]], list[Any]]:
    with _quiet():
        module = torch.export.load(str(path)).module()
    return lambda inputs: flatten_outputs(module(*inputs))


RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner, "torch.export": _torch_export_runner}


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")  # the torch.export-based exporter's external weights
    return size + (data.stat().st_size if data.exists() else 0)


def _opset(path: Path) -> int | None:
    onnx = require("onnx", "reading an ONNX file")
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# ------------------------------------------------------------------------------------------------- export
def _train_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore(flags: dict[nn.Module, bool]) -> None:
    for m, training in flags.items():
        m.training = training


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _check(run: Callable[[tuple[torch.Tensor, ...]], list[Any]], cases: list[tuple[tuple[torch.Tensor, ...], list]],
           atol: float, rtol: float) -> Parity:
    """Parity over every checked batch: the largest difference and tolerance, the first failure's detail."""
    results = [(inputs[0].shape[0], compare(reference, run(inputs), atol=atol, rtol=rtol))
               for inputs, reference in cases]
    failed = [(n, p) for n, p in results if not p.passed]
    return Parity(max(p.max_abs_diff for _, p in results), max(p.tolerance for _, p in results), not failed,
                  f"batch {failed[0][0]}: {failed[0][1].detail}" if failed else "")


def _value_probes(inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]] | None:
    """The example negated, and seeded random inputs of its mean and spread: other values, same shapes. None
    for inputs that are not floating point (token ids cannot be negated)."""
    if not all(x.is_floating_point() for x in inputs):
        return None
    g = torch.Generator().manual_seed(0)
    spread = [float(x.std()) if x.numel() > 1 else 1.0 for x in inputs]
    rand = tuple(torch.randn(x.shape, generator=g).to(x) * max(s, 1e-3) + x.mean() for x, s in zip(inputs, spread))
    return [tuple(-x for x in inputs), rand]


def _run_exporter(fmt: str, fn: Exporter, model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *,
                  dynamic: bool, opset: int | None, outputs: list[torch.Tensor], atol: float = ATOL,
                  rtol: float = RTOL) -> str:
    """Write `path` with one exporter; '' or, when a tracer turned a tensor into a bool and the file still
    matches eager on inputs of other values, a note saying so. Raises TraceDependsOnValues when it does not."""
    with torch.no_grad():
        suspect = fn(model, inputs, path, dynamic=dynamic, opset=opset, outputs=outputs)
    if suspect is None:
        return ""
    probes = _value_probes(inputs)
    if probes is not None:
        with torch.no_grad():
            cases = [(p, flatten_outputs(model(*p))) for p in probes]
        if _check(RUNNERS[fmt](path), cases, atol, rtol).passed:
            return (f"the tracer turned a tensor into a Python bool at {suspect.where}; the file also matches eager "
                    "on negated and on random inputs, so that branch does not depend on these values")
    raise suspect


def working_formats(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, exclude: str,
                    dynamic: bool = False) -> list[str]:
    """The formats (other than `exclude`) whose exporters take this model, tried in a scratch folder."""
    found = []
    with tempfile.TemporaryDirectory(prefix="kdforge-export-") as tmp, torch.no_grad():
        reference = flatten_outputs(model(*inputs))
        for fmt in FORMATS:
            if fmt == exclude:
                continue
            for name, fn in EXPORTERS[fmt]:
                try:
                    _run_exporter(fmt, fn, model, inputs, Path(tmp) / f"{name}{SUFFIX[fmt]}", dynamic=dynamic,
                                  opset=None, outputs=reference)
                except ImportError:
                    break  # the format's packages are missing: not a format that works here
                except Exception:
                    continue
                found.append(fmt)
                break
    return found


def export(model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor], path: str | Path, *,
           format: str = "onnx", dynamic_batch: bool = False, opset: int | None = None, check: bool = True,
           atol: float = ATOL, rtol: float = RTOL, suggest: bool = True,
           progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export `model` (called as `model(*example)`) to `path` in `format` and check the file against the eager
    model: outputs flattened and compared within `atol + rtol * max|eager output|` (1e-4 + 1e-4 * scale), on
    the example and, with `dynamic_batch`, at batch sizes 1 and 7 built from its rows.

    Raises ExportError naming what failed (operator, source line, module) and, with `suggest`, the formats that
    export the model (each tried in a scratch folder). A file that exports but fails the check is returned with
    `passed=False` when no other exporter of the format does better. `progress` receives one line per fallback.
    """
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(map(repr, FORMATS))}")
    if format == "onnx":  # all three up front: a missing one is one clear error, not a fallback
        for mod, why in (("onnx", "exporting to ONNX"), ("onnxscript", "exporting to ONNX"),
                         ("onnxruntime", "checking an ONNX file")):
            require(mod, why)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = _train_flags(model)
    model.eval()
    try:
        return _export(model, example, path, format, dynamic_batch, opset, check, atol, rtol, suggest, progress)
    finally:
        _restore(flags)


def _export(model: nn.Module, example: Any, path: Path, fmt: str, dynamic: bool, opset: int | None, check: bool,
            atol: float, rtol: float, suggest: bool, progress: Callable[[str], None] | None) -> ExportResult:
    device = _model_device(model)
    inputs = tuple(x.to(device) for x in as_inputs(example))
    n = inputs[0].shape[0] if inputs[0].dim() else 1
    # torch.export specialises a dimension of size 1; trace the batch dimension at >= 2 so it stays symbolic
    traced_inputs = with_batch(inputs, 2) if dynamic and n < 2 else inputs
    sizes = sorted({n, *CHECK_BATCHES}) if dynamic else [n]
    with torch.no_grad():
        cases = [(b_in, flatten_outputs(model(*b_in))) for b_in in
                 ((inputs if b == n else with_batch(inputs, b)) for b in sizes)]
        traced_outputs = flatten_outputs(model(*traced_inputs))
    failures: list[tuple[str, Failure]] = []
    fallbacks: list[str] = []
    kept: tuple[Path, ExportResult] | None = None  # an artefact that exported but failed the check
    scratch = []
    try:
        for name, fn in EXPORTERS[fmt]:
            tmp = path.with_name(f".{path.name}.{name}.tmp")
            scratch.append(tmp)
            try:
                note = _run_exporter(fmt, fn, model, traced_inputs, tmp, dynamic=dynamic, opset=opset,
                                     outputs=traced_outputs, atol=atol, rtol=rtol)
            except ImportError:
                raise
            except Exception as e:
                failure = read_failure(e, model, inputs)
                failures.append((name, failure))
                fallbacks.append(f"{name}: {failure.describe()}")
                _say(progress, fmt, name, failure.describe(), EXPORTERS[fmt])
                continue
            result = ExportResult(path=path, format=fmt, exporter=name, passed=None, max_abs_diff=None,
                                  tolerance=None, size_bytes=_file_size(tmp), dynamic_batch=dynamic,
                                  opset=_opset(tmp) if fmt == "onnx" else None, fallbacks=list(fallbacks),
                                  notes=[note] if note else [])
            if check:
                parity = _check(RUNNERS[fmt](tmp), cases, atol, rtol)
                result.passed, result.max_abs_diff, result.tolerance = parity.passed, parity.max_abs_diff, \
                    parity.tolerance
                result.batch_sizes, result.detail = tuple(sizes), parity.detail
                if not parity.passed:
                    fallbacks.append(f"{name}: outputs differ ({parity.detail})")
                    _say(progress, fmt, name, f"outputs differ ({parity.detail})", EXPORTERS[fmt])
                    kept = kept or (tmp, result)
                    continue
            os.replace(tmp, path)
            return result
        if kept is not None:  # no exporter matched: the first file that exported, with every attempt's story
            tmp, result = kept
            result.fallbacks = fallbacks
            os.replace(tmp, path)
            return result
    finally:
        for tmp in scratch:
            tmp.unlink(missing_ok=True)
    with torch.no_grad():
        alternatives = working_formats(model, inputs, exclude=fmt, dynamic=dynamic) if suggest else []
    tried = ", ".join(EXPORTER_NAMES[name] for name, _ in failures) if len(failures) > 1 else ""
    # the most telling of the exporters' failures: one that names a module or a line
    failure = next((f for _, f in failures if f.location or f.module is not None), failures[0][1])
    raise export_error(fmt, failure, alternatives, tried=tried, suggested=suggest)


def _say(progress: Callable[[str], None] | None, fmt: str, name: str, why: str,
         chain: list[tuple[str, Exporter]]) -> None:
    if progress is None:
        return
    names = [n for n, _ in chain]
    after = names[names.index(name) + 1:]
    nxt = f"; trying {EXPORTER_NAMES[after[0]]}" if after else ""
    progress(f"{fmt}: {EXPORTER_NAMES[name]} failed: {why}{nxt}")
