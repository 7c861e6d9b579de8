"""Does an exported artefact compute what the eager model computes? Outputs of any structure are flattened and
compared element-wise within one stated tolerance.

The tolerance is `atol + rtol * max|eager output|` over all outputs (defaults 1e-4 and 1e-4): float32
kernels of another runtime reorder sums, so the error that is acceptable grows with the size of the outputs,
and an absolute floor covers outputs near zero.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ATOL, RTOL = 1e-4, 1e-4


def as_inputs(example: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs as a tuple (a single tensor is the usual case)."""
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("the example input must be a tensor or a tuple of tensors (the model's positional inputs)")
    return inputs


def with_batch(inputs: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The inputs at batch size `n`, cycling through the example's own rows (real images stay real)."""
    out = []
    for x in inputs:
        idx = torch.arange(n, device=x.device) % x.shape[0]
        out.append(x.index_select(0, idx).contiguous())
    return tuple(out)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, in the order exporters flatten it: tuples and lists in order, dicts in
    insertion order, nested structures depth first. Python numbers become 0-d tensors; None is skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if hasattr(out, "_fields"):  # a namedtuple is a tuple already; other containers are not guessed at
        return flatten_outputs(tuple(out))
    if isinstance(out, (int, float, bool)):
        return [torch.tensor(out)]
    if out is None:
        return []
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}: return tensors, or tuples, "
                    "lists or dicts of them")


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class Parity:
    max_abs_diff: float
    tolerance: float
    passed: bool
    detail: str = ""  # why it failed, when it did: a shape or count mismatch, or the worst output


def compare(reference: Sequence[Any], actual: Sequence[Any], *, atol: float = ATOL, rtol: float = RTOL) -> Parity:
    """`actual` (the artefact's outputs) against `reference` (the eager model's), flattened alike."""
    ref = [_numpy(r).astype(np.float64) for r in reference]
    act = [_numpy(a).astype(np.float64) for a in actual]
    scale = max((float(np.abs(r).max()) for r in ref if r.size), default=0.0)
    tol = atol + rtol * scale
    if len(ref) != len(act):
        return Parity(float("inf"), tol, False, f"{len(act)} outputs where the eager model gives {len(ref)}")
    worst, where = 0.0, ""
    for i, (r, a) in enumerate(zip(ref, act)):
        if r.shape != a.shape:
            return Parity(float("inf"), tol, False, f"output {i} has shape {a.shape}, eager {r.shape}")
        if not r.size:
            continue
        if not np.isfinite(a).all() and np.isfinite(r).all():
            return Parity(float("inf"), tol, False, f"output {i} holds NaN or inf where the eager model does not")
        d = float(np.nanmax(np.abs(r - a)))
        if d > worst:
            worst, where = d, f"output {i}"
    passed = worst <= tol
    return Parity(worst, tol, passed, "" if passed else f"{where}: max |diff| {worst:.3g} > {tol:.3g}")
