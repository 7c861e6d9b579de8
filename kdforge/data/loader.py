"""`BatchLoader`: batches straight from a decoded uint8 cache, augmented per sample, prefetched in a thread.

Why not torch DataLoader: with the whole split decoded in one (memmapped) uint8 array, a batch is one fancy
index, one gather (crop + flip) and one fused multiply-add (normalise); doing that per sample in worker
processes costs far more than the work itself. Torch ops release the GIL, so one background thread is enough
to keep the next batches ready while the model runs.

Reproducibility is by construction, not by replay:
- the order of epoch e is `torch.randperm(N)` from a generator seeded with (seed, e);
- the augmentation of batch b of epoch e uses a generator seeded with (seed, e, b).
So batch b can be rebuilt without producing batches 0..b-1 (`iter_from`), which lets a trainer resume
mid-epoch exactly, and a teacher-output cache can trust `deterministic` loaders. A `sampler` (see
kdforge.data.samplers) replaces the permutation and draws from the same (seed, e) generator, so it keeps this.

The prefetch thread is stopped and joined on every way out: the iterator closed or collected, an exception
in the consumer (once its frame goes), and interpreter exit (an atexit hook): a daemon thread still inside a
torch op when Python finalises aborts the process ("terminate called without an active exception").
"""
from __future__ import annotations

import atexit
import copy
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kdforge.data.decoded import DecodedData
from kdforge.data.samplers import Sampler, check_order
from kdforge.data.transforms import (
    BatchAugment,
    crop_flip_numpy,
    normalize,
    normalize_numpy,
    random_crop_flip,
    resize,
)

#: ImageNet statistics, also what the public CIFAR ResNets (shared/data/cifar10-resnets) were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ORDER, _AUGMENT = 0, 1  # stream tags: the permutation and the augmentation never share random numbers


def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints through numpy's SeedSequence (well mixed, stable)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchLoader:
    """Iterate `{"image", "label", "index", **attrs}` batches over a DecodedData.

    image: float32 (B, 3, H, W) normalised with `mean`/`std` (channels_last memory format if asked);
    label, index and each attribute: int64 (B,). `index` is the sample's position in `data`.

    Call `set_epoch(e)` before each epoch (as with DistributedSampler); iterating twice without it repeats
    the same epoch exactly. `rank`/`world_size` give each process its share of every epoch, by whole batches:
    the epoch's order is cut into global batches of world_size * batch_size and rank r takes the r-th batch_size
    block of each, so the ranks' batch i together are exactly batch i of one process with the global batch, and a
    sampler that balances every block of batch_size (GroupClassBalancedSampler(batchwise=True)) balances every
    rank's batch. Without drop_last the order is padded by wrapping to whole global batches; with it, a last
    partial global batch is dropped.

    `sampler` sets each epoch's order instead of the permutation (`indices(data, epoch, generator)`, e.g.
    GroupClassBalancedSampler); its length is the epoch's length. `num_groups` overrides the group count
    read from the `group` attribute (build_loaders gives train and val the same one).
    """

    def __init__(
        self,
        data: DecodedData,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: BatchAugment | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        prefetch: int = 2,
        channels_last: bool = False,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        sampler: Sampler | None = None,
        num_groups: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment or BatchAugment()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = seed
        self.prefetch = max(0, prefetch)
        self.channels_last = channels_last
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.rank, self.world_size = rank, world_size
        self.sampler = sampler.bind(batch_size) if hasattr(sampler, "bind") else sampler
        self._num_groups = num_groups
        self.epoch = 0
        self._order: tuple[tuple, torch.Tensor] | None = None  # the last epoch's full order: get_batch asks often
        self._labels = torch.from_numpy(np.ascontiguousarray(data.labels, dtype=np.int64))
        self._attrs = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in data.attrs.items()}
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:  # the whole split, decoded, lives there; batches are built there
            self._images = torch.from_numpy(np.ascontiguousarray(data.images)).to(self.device)
            self._labels, self._attrs = self._labels.to(self.device), {k: v.to(self.device)
                                                                       for k, v in self._attrs.items()}
            self.prefetch, self.pin_memory = 0, False  # device ops are queued asynchronously already
        if drop_last and len(self) == 0:
            batch = (f"a global batch of {world_size} ranks x batch_size={batch_size}" if world_size > 1
                     else f"batch_size={batch_size}")
            what = "an epoch of its sampler has" if sampler is not None else "it has"
            raise ValueError(
                f"dataset {data.name!r}: {what} {self._epoch_length()} samples, fewer than {batch} with "
                "drop_last=True, so an epoch would have no batches; lower batch_size or set drop_last=False"
            )

    def with_sampler(self, sampler: Sampler | None) -> BatchLoader:
        """This loader with another epoch order (a method asking for group/class-balanced batches)."""
        new = copy.copy(self)
        new.sampler = sampler.bind(self.batch_size) if hasattr(sampler, "bind") else sampler
        new._order = None
        if new.drop_last and len(new) == 0:
            raise ValueError(f"dataset {self.data.name!r}: an epoch of {sampler!r} has {new._epoch_length()} "
                             f"samples, fewer than batch_size={self.batch_size}")
        return new

    # ------------------------------------------------------------ properties
    @property
    def deterministic(self) -> bool:
        """True when a dataset index always yields the same image tensor (no random augmentation)."""
        return not self.augment.is_random

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this loader yields (after any resize); no batch is built to know it."""
        size = self.augment.resize if self.augment.resize is not None else self.data.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return (3, int(h), int(w))

    @property
    def dataset_size(self) -> int:
        return len(self.data)

    @property
    def num_groups(self) -> int | None:
        """Number of groups (max + 1 of the `group` attribute), or None when the data has no groups."""
        if self._num_groups is not None:
            return self._num_groups
        col = self.data.attrs.get("group")
        return int(col.max()) + 1 if col is not None and len(col) else None

    def _epoch_length(self) -> int:
        if self.sampler is None:
            return len(self.data)
        known = self.sampler.num_samples(self.data) if hasattr(self.sampler, "num_samples") else None
        return int(known) if known is not None else len(self._full_order(self.epoch))

    def _per_rank(self) -> int:
        if self.world_size == 1:
            return self._epoch_length()
        return len(self) * self.batch_size  # whole blocks: padded (or, with drop_last, cut) to global batches

    def __len__(self) -> int:
        """Batches per epoch (of the current epoch, for a sampler whose epochs differ in length)."""
        n, per = self._epoch_length(), self.batch_size * self.world_size
        return n // per if self.drop_last else -(-n // per)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch`'s order and augmentation streams."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------ indices
    def _full_order(self, epoch: int) -> torch.Tensor:
        """Every rank's indices of `epoch` before sharding: the sampler's order, a permutation, or arange."""
        key = (epoch, self.seed, self.shuffle, id(self.sampler))  # attributes a caller may still change
        if self._order is not None and self._order[0] == key:
            return self._order[1]
        n = len(self.data)
        if self.sampler is not None:
            order = check_order(self.sampler.indices(self.data, epoch, _generator(self.seed, _ORDER, epoch)), n,
                                self.sampler)
        elif self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, _ORDER, epoch))
        else:
            order = torch.arange(n)
        self._order = (key, order)
        return order

    def _rank_order(self, epoch: int | None) -> torch.Tensor:
        order = self._full_order(self.epoch if epoch is None else epoch)
        if self.world_size > 1:
            n, per = len(order), self.batch_size * self.world_size
            total = n // per * per if self.drop_last else -(-n // per) * per
            if total > n:  # wrap around (again, for an epoch shorter than one global batch)
                order = order.repeat(-(-total // n))
            order = order[:total].view(-1, self.batch_size)[self.rank::self.world_size].reshape(-1)
        return order

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The dataset indices this rank visits in `epoch` (default: the current one), in order."""
        return self._rank_order(epoch).clone()  # a copy: the loader keeps the order for later batches

    def _num_batches(self, order: torch.Tensor) -> int:
        n = len(order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self, batch_idx: int, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices of batch `batch_idx` of `epoch`."""
        order = self._rank_order(epoch)
        if not 0 <= batch_idx < self._num_batches(order):
            raise IndexError(f"batch {batch_idx} out of range: this loader has {self._num_batches(order)} batches "
                             "per epoch")
        return order[batch_idx * self.batch_size:(batch_idx + 1) * self.batch_size].clone()

    # ------------------------------------------------------------ batches
    def make_batch(
        self, idx: torch.Tensor, batch_idx: int, epoch: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Build the batch of samples `idx` as batch `batch_idx` of `epoch` (its augmentation seed)."""
        e = self.epoch if epoch is None else epoch
        if self.device is not None:
            return self._make_batch_on_device(idx, batch_idx, e)
        idx_np = idx.numpy()
        # Batch work is numpy (single-threaded, GIL released): torch's intra-op pool, shared with the model
        # running in the main thread, made these small ops up to 50x slower on a busy 2-core machine.
        x = np.take(self.data.images, idx_np, axis=0)  # (B, H, W, 3) uint8; copies just these rows
        aug = self.augment
        if aug.is_random:
            x = crop_flip_numpy(x, aug.crop_pad, aug.flip, _generator(self.seed, _AUGMENT, e, batch_idx))
        if aug.resize is not None:
            x = resize(torch.from_numpy(x), aug.resize, channels_last=True).numpy()
        out = normalize_numpy(x, self.mean, self.std, channels_last=True, out_nchw=not self.channels_last)
        img = torch.from_numpy(out)
        if self.channels_last:
            img = img.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory: no copy
        batch = {"image": img, "label": self._labels[idx], "index": idx.clone()}
        for k, col in self._attrs.items():
            batch[k] = col[idx]
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _make_batch_on_device(self, idx: torch.Tensor, batch_idx: int, epoch: int) -> dict[str, torch.Tensor]:
        """make_batch with the images already on `device`: the same draws (from the same CPU generator), the
        gather, crop, flip, resize and normalisation run there, so the input pipeline never waits on the CPU."""
        on = idx.to(self.device)
        x = self._images.index_select(0, on)  # (B, H, W, 3) uint8
        aug = self.augment
        if aug.is_random:
            x = random_crop_flip(x, aug.crop_pad, aug.flip, _generator(self.seed, _AUGMENT, epoch, batch_idx))
        if aug.resize is not None:
            x = resize(x, aug.resize, channels_last=True)
        img = normalize(x, self.mean, self.std, channels_last=True).permute(0, 3, 1, 2)  # NCHW, channels_last memory
        batch = {"image": img if self.channels_last else img.contiguous(), "label": self._labels[on], "index": on}
        for k, col in self._attrs.items():
            batch[k] = col[on]
        return batch

    def get_batch(self, batch_idx: int, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """Batch `batch_idx` of `epoch`, exactly as iteration yields it."""
        return self.make_batch(self.batch_indices(batch_idx, epoch), batch_idx, epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, batch_idx: int) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate the current epoch from batch `batch_idx` on; earlier batches are never built.

        The result is a generator: `close()` it (or drop it) to stop the prefetch thread at once.
        """
        epoch = self.epoch
        order = self._rank_order(epoch)
        n_batches = self._num_batches(order)
        if not 0 <= batch_idx <= n_batches:
            raise IndexError(f"cannot start at batch {batch_idx}: this loader has {n_batches} batches")
        jobs = [(b, order[b * self.batch_size:(b + 1) * self.batch_size]) for b in range(batch_idx, n_batches)]
        if self.prefetch == 0:
            return (self.make_batch(idx, b, epoch) for b, idx in jobs)
        return _prefetched(lambda job: self.make_batch(job[1], job[0], epoch), jobs, self.prefetch)

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.data.name!r}, n={len(self.data)}, batch_size={self.batch_size}, "
            f"batches={len(self)}, shuffle={self.shuffle}, augment={self.augment})"
        )


def _prefetched(fn: Any, jobs: list, depth: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `fn(job)` for each job, computed `depth` ahead in a thread that is joined in `finally`.

    The thread starts with the first `next()`, so an iterator that is never used starts none.
    """
    prefetcher = _Prefetcher(fn, jobs, depth)
    try:
        yield from prefetcher
    finally:  # close(), garbage collection and errors raised from `fn` all pass here
        prefetcher.close()


class _Prefetcher:
    """Runs `fn` over `jobs` in a daemon thread, `depth` results ahead; re-raises its errors in order.

    The thread holds only the queue and the stop flag (not this object), so dropping the iterator lets it be
    collected. `close()` stops and joins the thread; `__del__` and the atexit hook call it.
    """

    def __init__(self, fn: Any, jobs: list, depth: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(self._q, self._stop, fn, jobs), daemon=True, name="kdforge-prefetch"
        )
        _LIVE.add(self)
        self._thread.start()

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._stop.is_set():
            raise StopIteration
        ok, item = self._q.get()
        if not ok:
            self.close()
            raise item
        if item is _DONE:
            self.close()
            raise StopIteration
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it (it finishes the batch in hand first)."""
        self._stop.set()
        try:  # unblock a producer waiting on a full queue
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout)
        _LIVE.discard(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - late in interpreter shutdown, modules may already be gone
            pass


_DONE = object()
_LIVE: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()


@atexit.register
def _stop_all_prefetchers() -> None:
    """At interpreter exit, before daemon threads are frozen mid-op: stop and join every live prefetcher
    (an exception that ends the program keeps its frames, and so their iterators, alive until then)."""
    for prefetcher in list(_LIVE):
        prefetcher.close()


def _produce(q: queue.Queue, stop: threading.Event, fn: Any, jobs: list) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for job in jobs:
            if stop.is_set() or not put((True, fn(job))):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put((False, e))
        return
    put((True, _DONE))
