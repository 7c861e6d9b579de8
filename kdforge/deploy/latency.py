"""A latency harness whose numbers can be compared: warm-up calls first, the thread count pinned (torch's
intra-op pool, and ONNX Runtime's, built for that count) and restored after, many timed calls, the median and
the spread reported, never one run.

    eager = measure(eager_backend(model), image, batch_size=1, threads=1)
    ort = measure(onnxruntime_backend("student.onnx"), image, batch_size=1, threads=1)
    ratio(ort, eager)   # ORT time / eager time; raises when the two were measured with different thread counts

Per call the clock runs around the forward only (the input is built before); a CUDA call is synchronised
before the clock stops, or it would time the kernel launch.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.deploy.parity import as_inputs, with_batch

Call = Callable[[tuple[torch.Tensor, ...]], Any]


class ThreadCountMismatch(ValueError):
    """Two latencies measured with different thread counts were compared: the ratio would measure the threads."""


@dataclass(frozen=True)
class Backend:
    """Something to time. `prepare(threads)` builds the call (an ORT session is made for a thread count) and
    `device` is where inputs go ("cpu" or "cuda")."""

    name: str  # "eager-cpu", "onnxruntime-cpu", "eager-cuda", ...
    prepare: Callable[[int], Call]
    device: str = "cpu"


@dataclass(frozen=True)
class Latency:
    """Timings of one backend at one batch size, with the thread count they were measured with."""

    backend: str
    batch_size: int
    threads: int
    times_ms: tuple[float, ...]  # wall time of each timed call, per batch
    warmup: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        """(Q1, Q3) of the per-batch times; with fewer than two calls both are the one time."""
        if len(self.times_ms) < 2:
            return self.times_ms[0], self.times_ms[0]
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def iqr_ms(self) -> float:
        q1, q3 = self.quartiles_ms
        return q3 - q1

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch_size

    @property
    def per_image_spread_ms(self) -> float:
        """Half the interquartile range, per image: the ± beside the median."""
        return self.iqr_ms / 2 / self.batch_size

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1000)

    def __str__(self) -> str:
        return (f"{self.backend} batch {self.batch_size}, {self.threads} thread(s): {self.per_image_ms:.3f} ± "
                f"{self.per_image_spread_ms:.3f} ms/image (median ± IQR/2 of {len(self.times_ms)} calls), "
                f"{self.images_per_s:.0f} images/s")


def check_same_threads(*results: Latency) -> int:
    """The thread count all `results` share, or ThreadCountMismatch naming them."""
    counts = {r.threads for r in results}
    if len(counts) > 1:
        raise ThreadCountMismatch("refusing to compare latencies measured with different thread counts: "
                                  + ", ".join(f"{r.backend} at batch {r.batch_size}: {r.threads}" for r in results)
                                  + "; measure them again with one --threads")
    return counts.pop()


def ratio(a: Latency, b: Latency) -> float:
    """a's median time per image over b's (ONNX Runtime / eager: below 1 means ORT is faster)."""
    check_same_threads(a, b)
    return a.per_image_ms / b.per_image_ms


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch's intra-op pool at `n` threads, restored on exit."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eager_backend(model: nn.Module, device: str = "cpu") -> Backend:
    """The PyTorch model itself, in eval mode under inference_mode, on `device` ("cpu" or "cuda")."""
    def prepare(threads: int) -> Call:
        model.to(device).eval()

        def call(inputs: tuple[torch.Tensor, ...]) -> Any:
            with torch.inference_mode():
                return model(*inputs)

        return call

    return Backend(f"eager-{torch.device(device).type}", prepare, device)


def onnxruntime_backend(path: str | Path) -> Backend:
    """An ONNX file in ONNX Runtime's CPU execution provider, its session built for the pinned thread count."""
    from kdforge.deploy.runtime import ort_session, run_session

    def prepare(threads: int) -> Call:
        session = ort_session(path, threads)
        return lambda inputs: run_session(session, inputs)

    return Backend("onnxruntime-cpu", prepare, "cpu")


def measure(backend: Backend, example: torch.Tensor | tuple[torch.Tensor, ...], *, batch_size: int = 1,
            threads: int = 1, warmup: int = 3, repeats: int = 20) -> Latency:
    """Time `repeats` calls of `backend` on a batch of `batch_size` built from the example's rows, after
    `warmup` untimed calls, with `threads` intra-op threads."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = tuple(x.to(backend.device) for x in with_batch(as_inputs(example), batch_size))
    cuda = torch.device(backend.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with pinned_threads(threads):
        call = backend.prepare(threads)
        for _ in range(warmup):
            call(inputs)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(inputs)
            sync()
            times.append((time.perf_counter() - start) * 1000)
    return Latency(backend.name, batch_size, threads, tuple(times), warmup)
