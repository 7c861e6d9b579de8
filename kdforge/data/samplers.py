"""Epoch orders for BatchLoader: the `sampler=` hook and a group/class-balanced sampler.

A sampler is any object with `indices(data, epoch, generator) -> torch.Tensor`: the dataset indices of one
epoch, in order (indices may repeat; the length sets the epoch length). BatchLoader passes a generator seeded
from (seed, epoch), so a sampler that draws only from it makes every epoch reproducible: batch b of epoch e
can be rebuilt alone, which is what exact mid-epoch resume needs. An optional `num_samples(data)` gives the
epoch length without drawing an epoch (None when only the drawn epoch knows it).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kdforge.data.decoded import DecodedData


@runtime_checkable
class Sampler(Protocol):
    def indices(self, data: DecodedData, epoch: int, generator: torch.Generator) -> torch.Tensor: ...


class GroupClassBalancedSampler:
    """Each epoch, the same number of samples from every (group, class) cell present, shuffled together.

    This is group-balanced sampling ("SS" in fairness papers, e.g. Wang et al. 2020, CIFAR-10S): a model
    sees every group of every class equally often, whatever the imbalance of the data. `per_cell` defaults
    to the size of the largest cell; a smaller cell is drawn with replacement to that count, a larger one
    is subsampled without replacement. Cells are read from the attribute `group_key` and the labels.

    >>> import numpy as np
    >>> from kdforge.data import BatchLoader, DecodedData
    >>> data = DecodedData(np.zeros((6, 4, 4, 3), np.uint8), [0, 0, 0, 0, 1, 1], ["a", "b"],
    ...                    attrs={"group": [0, 0, 0, 1, 0, 1]})
    >>> loader = BatchLoader(data, 4, sampler=GroupClassBalancedSampler())
    >>> len(loader.epoch_indices())  # cells (0,a) x3, (1,a) (0,b) (1,b) x1: 4 cells x 3 (the largest cell)
    12
    """

    def __init__(self, per_cell: int | None = None, group_key: str = "group", *, batchwise: bool = False,
                 batch_size: int | None = None) -> None:
        if per_cell is not None and per_cell < 1:
            raise ValueError(f"per_cell must be >= 1, got {per_cell}")
        self.per_cell = per_cell
        self.group_key = group_key
        self.batchwise = batchwise  # balance every batch, not only the epoch (see `_batchwise`)
        self.batch_size = batch_size

    def bind(self, batch_size: int) -> GroupClassBalancedSampler:
        """This sampler for a loader of `batch_size` (BatchLoader calls it): batch-wise balance needs the size."""
        if not self.batchwise:
            return self
        return GroupClassBalancedSampler(self.per_cell, self.group_key, batchwise=True, batch_size=batch_size)

    def _cells(self, data: DecodedData) -> list[torch.Tensor]:
        """Dataset indices of each (group, class) cell present, cells in (group, class) order."""
        if self.group_key not in data.attrs:
            have = ", ".join(sorted(data.attrs)) or "none"
            raise ValueError(f"GroupClassBalancedSampler needs attribute {self.group_key!r} in dataset "
                             f"{data.name!r} (its attributes: {have})")
        key = np.asarray(data.attrs[self.group_key], np.int64) * max(1, data.num_classes) + data.labels
        order = np.argsort(key, kind="stable")
        _, starts = np.unique(key[order], return_index=True)
        return [torch.from_numpy(c) for c in np.split(order, starts[1:])] if len(order) else []

    def _per_cell(self, cells: list[torch.Tensor]) -> int:
        return self.per_cell if self.per_cell is not None else max((len(c) for c in cells), default=0)

    def num_samples(self, data: DecodedData) -> int | None:
        if self.batchwise:  # which cells take the remainder varies, so the batch count can vary by epoch
            return None  # BatchLoader then measures the (cached) epoch order itself
        cells = self._cells(data)
        return len(cells) * self._per_cell(cells)

    def indices(self, data: DecodedData, epoch: int, generator: torch.Generator) -> torch.Tensor:
        cells = self._cells(data)
        k = self._per_cell(cells)
        if not cells:
            return torch.zeros(0, dtype=torch.int64)
        parts = []
        for cell in cells:  # every draw comes from `generator`, in a fixed cell order: reproducible
            if len(cell) >= k:
                parts.append(cell[torch.randperm(len(cell), generator=generator)[:k]])
            else:
                parts.append(cell[torch.randint(0, len(cell), (k,), generator=generator)])
        if not self.batchwise:
            out = torch.cat(parts)
            return out[torch.randperm(len(out), generator=generator)]
        return self._batchwise(torch.stack(parts), generator)

    def _batchwise(self, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Every batch takes batch_size // cells samples from each cell's stream (MFD's `--labelwise` batches);
        the remainder of a batch goes to cells drawn at random, one extra sample each, so batches keep the
        loader's size. The epoch ends when the streams (all as long as the largest cell) run out."""
        if self.batch_size is None:
            raise ValueError("a batch-wise GroupClassBalancedSampler needs the batch size: give it to a BatchLoader "
                             "(which binds its own) or pass batch_size=")
        n_cells, k = streams.shape
        per = self.batch_size // n_cells
        if per < 1:
            raise ValueError(f"GroupClassBalancedSampler: batch_size={self.batch_size} is smaller than the "
                             f"{n_cells} (group, class) cells; use a batch of at least {n_cells}")
        extra = self.batch_size - per * n_cells
        pos = torch.zeros(n_cells, dtype=torch.int64)
        batches = []
        while True:
            take = torch.full((n_cells,), per, dtype=torch.int64)
            if extra:
                take[torch.randperm(n_cells, generator=generator)[:extra]] += 1
            if bool((pos + take > k).any()):
                break
            batch = torch.cat([streams[c, pos[c]:pos[c] + take[c]] for c in range(n_cells)])
            batches.append(batch[torch.randperm(len(batch), generator=generator)])
            pos += take
        return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)

    def __repr__(self) -> str:
        batch = f", batchwise=True, batch_size={self.batch_size}" if self.batchwise else ""
        return f"GroupClassBalancedSampler(per_cell={self.per_cell}, group_key={self.group_key!r}{batch})"


#: samplers a recipe may name in `data.sampler` (SS in the fairness papers is `group_class_balanced`)
SAMPLERS = {"group_class_balanced": GroupClassBalancedSampler}


def build_sampler(name: str | None, batchwise: bool = True) -> Any:
    """A sampler named in a recipe (`data.sampler`), or None; `batchwise` balances every batch, not only
    the epoch, as the fairness papers' group-balanced sampling (SS) does."""
    if name is None:
        return None
    if name not in SAMPLERS:
        from kdforge.registry import did_you_mean

        raise ValueError(f"unknown sampler {name!r}{did_you_mean(name, list(SAMPLERS))} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[name](batchwise=batchwise)


def check_order(order: Any, n: int, sampler: Any) -> torch.Tensor:
    """A sampler's output as a 1-D int64 tensor of indices in [0, n); a clear error otherwise."""
    t = torch.as_tensor(order)
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"sampler {sampler!r} must return a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"sampler {sampler!r} returned indices out of range for {n} samples "
                         f"(min {int(t.min())}, max {int(t.max())})")
    return t
