"""Shared bits of the benchmarks: interleaved A/B timing (these machines are noisy) and result tables."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def fixed_batches(n: int, batch_size: int, size: int = 32, classes: int = 10, seed: int = 0) -> list[dict]:
    """`n` in-memory dict batches with dataset indices, so data loading is not what is measured."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch_size, 3, size, size, generator=g),
             "label": torch.randint(0, classes, (batch_size,), generator=g),
             "index": torch.arange(i * batch_size, (i + 1) * batch_size)} for i in range(n)]


def interleaved(fns: dict[str, Callable[[], None]], rounds: int = 5) -> dict[str, float]:
    """Median seconds of each function, run in alternation `rounds` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timing_args(doc: str | None) -> argparse.ArgumentParser:
    """The options every step-timing benchmark takes: steps per round, batch size, rounds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    return ap


def publish(lines: list[str], path: str | Path | None) -> None:
    """Print a result table and, when `path` is given, write it there (results/*.md)."""
    text = "\n".join(lines)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)
