"""Loaders for methods that need more than one stream of batches, or none at all.

- `CombinedLoader({"ood": a, "real": b})`: named loaders stepped together; each batch is
  `{"ood": batch_a, "real": batch_b}` (Lightning's dict of iterables). `mode="max_size_cycle"` runs as long as
  the longest and restarts the shorter ones; `"min_size"` stops with the shortest.
- `DataFree(steps, batch_size)`: an epoch of known length for methods that make their own inputs (a
  generator); each batch is `{"batch_size": B, "step": i}`.
- `IndexedDataset(dataset, group=...)`: a map-style dataset of (image, label) as dict samples with the sample
  `index` and any per-sample attributes, for a plain torch DataLoader.

All are exact under resume: `set_epoch(e)` and `iter_from(b)` rebuild the same batches without drawing the
earlier ones when the inner loaders can (kdforge's BatchLoader can).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

MODES = ("max_size_cycle", "min_size")


def _length(loader: Iterable, name: str) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"CombinedLoader: loader {name!r} has no len()") from None


class CombinedLoader:
    """Step several named loaders together; batches are dicts of their batches (see module docstring).

    A loader restarted by `max_size_cycle` in epoch e, cycle c, is given epoch `e * cycles + c` so each cycle
    draws a new order, and the same one again on resume.
    """

    def __init__(self, loaders: Mapping[str, Iterable], mode: str = "max_size_cycle") -> None:
        if not loaders:
            raise ValueError("CombinedLoader needs at least one loader")
        if mode not in MODES:
            raise ValueError(f"CombinedLoader mode {mode!r} is not one of {MODES}")
        self.loaders = dict(loaders)
        self.mode = mode
        self.lengths = {k: _length(v, k) for k, v in self.loaders.items()}
        if min(self.lengths.values()) == 0:
            empty = [k for k, n in self.lengths.items() if n == 0]
            raise ValueError(f"CombinedLoader: loader(s) {empty} yield no batches")
        self.epoch = 0

    def __len__(self) -> int:
        lengths = self.lengths.values()
        return max(lengths) if self.mode == "max_size_cycle" else min(lengths)

    def __getattr__(self, name: str) -> Any:
        # dataset facts (num_classes, image_shape, deterministic, ...) come from the first loader
        if name.startswith("_") or name in ("loaders", "lengths", "mode", "epoch"):
            raise AttributeError(name)
        return getattr(next(iter(self.loaders.values())), name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(0)

    def iter_from(self, batch_idx: int) -> Iterator[dict[str, Any]]:
        total = len(self)
        if not 0 <= batch_idx <= total:
            raise IndexError(f"cannot start at batch {batch_idx}: this loader has {total} batches")
        streams = {k: self._stream(k, batch_idx, total) for k in self.loaders}
        for _ in range(batch_idx, total):
            yield {k: next(s) for k, s in streams.items()}

    def _stream(self, name: str, start: int, total: int) -> Iterator[Any]:
        """Loader `name`'s batches from combined batch `start` on, restarting it as often as needed."""
        loader, n = self.loaders[name], self.lengths[name]
        cycles = -(-total // n)
        cycle, offset = divmod(start, n)
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch * cycles + cycle)
            if offset and hasattr(loader, "iter_from"):
                it = loader.iter_from(offset)
            else:
                it = iter(loader)
                for _ in range(offset):  # a plain iterable: draw and drop what was done
                    next(it)
            yield from it
            cycle, offset = cycle + 1, 0


class DataFree:
    """`steps` batches an epoch of `{"batch_size": B, "step": i}`, for methods that synthesise their inputs.

    The optional facts are those of the data the method stands in for (what a BatchLoader says of its own), so
    `kdforge.distill` can give the method the input shape, class count and normalisation of the task:
    `DataFree(120, 256, image_shape=(3, 32, 32), num_classes=10, mean=..., std=...)`.
    """

    deterministic = True

    def __init__(self, steps: int, batch_size: int, *, image_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        if steps < 1 or batch_size < 1:
            raise ValueError(f"DataFree needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
        self.steps, self.batch_size = int(steps), int(batch_size)
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_classes = num_classes
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:  # nothing to reorder; kept for the loader protocol
        pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(0)

    def iter_from(self, batch_idx: int) -> Iterator[dict[str, Any]]:
        return ({"batch_size": self.batch_size, "step": i} for i in range(batch_idx, self.steps))


class IndexedDataset(torch.utils.data.Dataset):
    """`dataset[i] = (image, label)` as `{"image", "label", "index": i, **{k: attrs[k][i]}}`.

    >>> ds = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.arange(4)),
    ...                     group=torch.tensor([0, 1, 0, 1]))
    >>> sorted(ds[1])
    ['group', 'image', 'index', 'label']
    """

    def __init__(self, dataset: Sequence, **attrs: Sequence[int] | torch.Tensor) -> None:
        n = len(dataset)
        for k, v in attrs.items():
            if len(v) != n:
                raise ValueError(f"IndexedDataset: attribute {k!r} has {len(v)} values for {n} samples")
        self.dataset = dataset
        self.attrs = {k: torch.as_tensor(v) for k, v in attrs.items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.dataset[i][:2]
        return {"image": image, "label": torch.as_tensor(label), "index": torch.tensor(i),
                **{k: v[i] for k, v in self.attrs.items()}}

    @property
    def num_groups(self) -> int | None:
        g = self.attrs.get("group")
        return int(g.max()) + 1 if g is not None and len(g) else None
