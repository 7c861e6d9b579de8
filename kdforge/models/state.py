"""Context managers over a network's training state, for methods that pass one network's loss through another
(a generator's loss through the student, a student's loss through an energy model)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def no_weight_grads(*modules: nn.Module) -> Iterator[None]:
    """No parameter gradients for `modules` inside (their inputs still get them): a generator's loss backpropagates
    through the student without computing (or leaving behind) the student's weight gradients."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def keep_running_stats(*modules: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with the batch's statistics, but their running statistics (and
    batch counters) stay as they were: a forward pass that must not count as that network's own training data."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
