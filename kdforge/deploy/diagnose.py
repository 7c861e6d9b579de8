"""Why an export failed, in one line a user can act on: the operator or the Python line that could not be
exported, the module it sits in, and the formats that would work.

Exporters bury that in pages of text (the torch.export-based ONNX exporter prints its three steps and a graph
dump; the legacy one names the operator only). What is parsed here: the operator from either exporter's
message, the user's source line from torch.export's "The following call raised this error" frame, and the
module from the line (its class's `forward`) or from the scope of the operator in a TorchScript trace.
"""
from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "torch.export")
_TORCH_DIR = str(Path(torch.__file__).parent)

_OPERATOR = (
    re.compile(r"[Ee]xporting the operator '([^']+)'"),  # legacy ONNX: UnsupportedOperatorError
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo ONNX: DispatchError
    re.compile(r"call_function\[target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),  # dynamo ONNX: ConversionError
    re.compile(r"[Uu]nknown builtin op: ([\w:.]+)"),  # torch.jit.script
)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(\S.*)')
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent")


class ExportError(ValueError):
    """A model could not be exported (or its artefact could not be checked); the message names the format,
    what failed (an operator or a source line, and its module) and the formats that would work."""

    def __init__(self, message: str, *, format: str, operator: str | None = None, module: str | None = None,
                 location: str | None = None, alternatives: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.format, self.operator, self.module, self.location = format, operator, module, location
        self.alternatives = tuple(alternatives)


@dataclass
class Failure:
    """What an exporter's exception says went wrong, as far as it can be read."""

    what: str  # "operator 'aten::fft_fft'", "data-dependent control flow", or the exception's first line
    operator: str | None = None
    module: str | None = None  # the module path in the model ('layer1.0.body'), '' for the model itself
    location: str | None = None  # file:line: code

    def describe(self) -> str:
        where = []
        if self.module is not None:
            where.append(f"in module {self.module!r}" if self.module else "in the model's own forward")
        if self.location:
            where.append(f"at {self.location}")
        return " ".join([self.what, *where])


def exception_text(e: BaseException) -> str:
    """The messages of an exception and of everything it was raised from."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _first_line(e: BaseException) -> str:
    """The line of an exception that says what went wrong (the dynamo exporter's is under 'Exception summary')."""
    text = str(e).strip()
    summary = re.search(r"## Exception summary\s*\n\s*(?:<class '[\w.]+\.(\w+)'>: )?(.+)", text)
    if summary:
        return f"{summary.group(1) or type(e).__name__}: {summary.group(2).strip()[:200]}"
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # the dynamo exporter colours its messages
        if line:
            return f"{type(e).__name__}: {line[:200]}"
    return type(e).__name__


def source_line(file: str, line: int) -> str:
    """Line `line` of `file`, stripped; '' when it cannot be read."""
    try:
        return Path(file).read_text().splitlines()[line - 1].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


def _user_frame(text: str) -> tuple[str, int, str] | None:
    """The last frame outside torch in a message: (file, line, code)."""
    frames = [(f, int(n), code.strip()) for f, n, _, code in _FRAME.findall(text) if not f.startswith(_TORCH_DIR)]
    return frames[-1] if frames else None


def module_at(model: nn.Module, file: str, line: int) -> str | None:
    """The path of the first module (outermost first) whose class's `forward` holds `file:line`."""
    for name, mod in model.named_modules():
        fwd = type(mod).forward
        try:
            src, start = inspect.getsourcelines(fwd)
            where = inspect.getsourcefile(fwd)
        except (OSError, TypeError):
            continue
        if where and Path(where).resolve() == Path(file).resolve() and start <= line < start + len(src):
            return name
    return None


def _same_op(kind: str, operator: str) -> bool:
    """'aten::linalg_eigvals' (a TorchScript node) matches 'aten.linalg_eig' (an exported-program target)."""
    a, b = kind.replace("::", "."), operator.replace("::", ".")
    return a == b or a.startswith(b) or b.startswith(a)


def _locate_in_trace(model: nn.Module, inputs: tuple[torch.Tensor, ...], operator: str) -> tuple[str, str] | None:
    """(module path, file:line) of the first node of `operator` in a TorchScript trace of the model."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, inputs, check_trace=False, strict=False).inlined_graph
    except Exception:
        return None
    for node in graph.nodes():
        if _same_op(node.kind(), operator):
            scope = node.scopeName().split("/")[-1]
            module = scope.removeprefix("__module.").removeprefix("__module") if scope else ""
            frames = re.findall(r"([^\s'\"]+)\((\d+)\): \w+", str(node.sourceRange()))
            user = [(f, n) for f, n in frames if not f.startswith(_TORCH_DIR)]
            if not user:
                return module, ""
            code = source_line(user[0][0], int(user[0][1]))
            return module, f"{user[0][0]}:{user[0][1]}" + (f": {code}" if code else "")
    return None


def read_failure(e: BaseException, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Failure:
    """What `e` (raised by an exporter on `model`) says failed, with the module it failed in."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", exception_text(e))
    operator = next((m.group(1) for pat in _OPERATOR if (m := pat.search(text))), None)
    frame = _user_frame(text)
    if isinstance(e, TraceDependsOnValues):
        frame = (e.file, e.line, e.code)
    if operator:
        what = f"operator '{operator}' (not supported by this exporter)"
    elif isinstance(e, TraceDependsOnValues) or any(k in text for k in _DATA_DEPENDENT):
        what = "data-dependent control flow (Python branching on a tensor's value)"
    else:
        what = _first_line(e)
    module = location = None
    if frame:
        file, line, code = frame
        location = f"{file}:{line}: {code}" if code else f"{file}:{line}"
        module = module_at(model, file, line)
    elif operator:
        found = _locate_in_trace(model, inputs, operator)
        if found:
            module, location = found[0], found[1] or None
    return Failure(what, operator, module, location)


class TraceDependsOnValues(RuntimeError):
    """A trace turned a tensor into a Python bool (TorchScript tracing and the legacy ONNX exporter only warn
    about it): the graph holds the branch the example took. Harmless for a shape check, wrong for a branch on
    values; the exporter runs the file on inputs of other values to tell which."""

    def __init__(self, file: str, line: int, code: str) -> None:
        super().__init__(f"the trace turns a tensor into a Python bool at {file}:{line}")
        self.file, self.line, self.code = file, line, code

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" + (f" ({self.code})" if self.code else "")


def value_branch(caught: list[warnings.WarningMessage]) -> TraceDependsOnValues | None:
    """The first 'Converting a tensor to a Python boolean' TracerWarning among `caught`, as an exception."""
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message):
            return TraceDependsOnValues(w.filename, w.lineno, source_line(w.filename, w.lineno))
    return None


def export_error(fmt: str, failure: Failure, alternatives: Sequence[str], *, tried: str = "",
                 suggested: bool = True) -> ExportError:
    """The ExportError for a failed format: what failed, where, and what to try instead."""
    others = [f for f in FORMATS if f != fmt]
    if alternatives:
        hint = f"; these formats export it: {', '.join(alternatives)} (--format {alternatives[0]})"
    elif not suggested:
        hint = f"; other formats may work: {', '.join(others)}"
    else:
        fix = ("replace that operator" if failure.operator else
               "rewrite the branch with torch.where (or torch.cond)" if "control flow" in failure.what else
               "change that code")
        hint = f"; no other format exports it either ({', '.join(others)} tried): {fix}"
    via = f" (tried {tried})" if tried else ""
    return ExportError(f"cannot export to {fmt}{via}: {failure.describe()}{hint}", format=fmt,
                       operator=failure.operator, module=failure.module, location=failure.location,
                       alternatives=alternatives)
