"""ONNX Runtime, on the CPU, with a fixed thread count: a session, and a module that wraps one so kdforge's
evaluators can score an ONNX file as they score an nn.Module."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.deploy._optional import require


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime.InferenceSession of `path` on the CPU execution provider. `threads` pins ORT's intra-op
    pool (one inter-op thread, sequential execution), so its numbers compare with torch's at the same count;
    None leaves ORT's default (all cores)."""
    ort = require("onnxruntime", "running an ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every initializer it folds
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session: Any, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    """The session's outputs (numpy arrays, in graph order) for torch `inputs`, fed by position."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), given {len(inputs)}")
    return session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)})


class OrtModule(nn.Module):
    """An ONNX file behind an nn.Module's call (CPU, the first output as a tensor), for kdforge.evaluate."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(path, threads)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = run_session(self.session, inputs)[0]
        return torch.from_numpy(out).to(inputs[0].device)
