"""Shared bits of the benchmarks: interleaved A/B timing (these machines are noisy) and result tables."""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kdforge.models.cost import interleaved  # noqa: F401  (the benchmarks' side-by-side timer lives with count_macs)

REPO = Path(__file__).resolve().parents[1]


def fixed_batches(n: int, batch_size: int, size: int = 32, classes: int = 10, seed: int = 0) -> list[dict]:
    """`n` in-memory dict batches with dataset indices, so data loading is not what is measured."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch_size, 3, size, size, generator=g),
             "label": torch.randint(0, classes, (batch_size,), generator=g),
             "index": torch.arange(i * batch_size, (i + 1) * batch_size)} for i in range(n)]


def timing_args(doc: str | None) -> argparse.ArgumentParser:
    """The options every step-timing benchmark takes: steps per round, batch size, rounds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    return ap


def run_logged(cmd: list[str], log: Path, cwd: Path = REPO) -> None:
    """Run one table row as its own process on one thread, its output in `log`; fail naming the log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")


def run_plan(plan: list[tuple[str, list[str]]], folder: Path, jobs: int) -> float:
    """Run every (name, command) of a table, `jobs` at a time, each into folder/<name> with its log and its
    process seconds beside it; a run whose summary.json exists is skipped, so a stopped table resumes. Returns the
    process seconds of the whole plan, earlier sessions' runs included."""
    t0 = time.perf_counter()

    def go(item: tuple[str, list[str]]) -> None:
        name, cmd = item
        if (folder / name / "summary.json").exists():
            return
        t = time.perf_counter()
        run_logged(cmd, folder / f"{name}.log")
        seconds = time.perf_counter() - t
        (folder / f"{name}.seconds").write_text(f"{seconds:.1f}\n")
        print(f"{name}: {seconds:.0f} s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(go, plan))
    print(f"all runs done in {(time.perf_counter() - t0) / 60:.0f} min", flush=True)
    return sum(float((folder / f"{name}.seconds").read_text()) for name, _ in plan)


def set_args(pairs: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]: recipe overrides for a kdforge command line."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def machine() -> str:
    """Where a table ran, for its 'Produced by' line: the GPU when there is one (train.device auto picks it)."""
    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name()}"
    return f"{os.cpu_count()} CPU cores"


def publish(lines: list[str], path: str | Path | None) -> None:
    """Print a result table and, when `path` is given, write it there (results/*.md)."""
    text = "\n".join(lines)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)
