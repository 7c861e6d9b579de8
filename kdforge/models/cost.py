"""What a network costs to run, counted by torch rather than by hand, and timed side by side."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdforge.models.state import no_weight_grads


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass `model(*inputs)`, counted by FlopCounterMode (FLOPs / 2); works on
    the meta device (shapes only, nothing computed).

    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.zeros(1, 3, 16, 16))  # 16*16 px * 8 out * 3*3*3
    55296
    """
    counter = FlopCounterMode(display=False)
    # weights out of autograd too: a module returning a parameter itself (a flow's learned prior) would otherwise
    # trip the counter's module tracker, which hooks every output that requires grad
    with no_weight_grads(model), counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5) -> dict[str, float]:
    """Median seconds of each function, run in alternation `rounds` times after one warm-up each: on a busy machine
    the load slows every function alike, so their ratios hold where one-after-the-other timings would not."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
