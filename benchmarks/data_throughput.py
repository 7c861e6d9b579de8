"""Images/s of kdforge's BatchLoader against a per-sample torchvision.transforms.v2 DataLoader.

Both read the same 50,000 x 32 x 32 decoded uint8 cache (a memmap) and do the same work: pad-4 random crop,
horizontal flip, float conversion and normalisation, batches of 128. The baseline is the usual recipe
(transform per sample in a Dataset, DataLoader collates), measured in the same run with 0 and 2 workers.
Also times the first CIFAR-10 prepare from the shared tar.gz when ../shared/data is there (else the cache is
the synthetic dataset), and the bare random_crop_flip kernel.

    .venv/bin/python benchmarks/data_throughput.py [--batches 200] [--baseline-batches 60]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdforge.data import (
    BatchAugment,
    BatchLoader,
    DecodedData,
    load_split,
    make_synthetic,
    prepare,
    random_crop_flip,
    shared_data_dir,
)
from kdforge.data.loader import IMAGENET_MEAN, IMAGENET_STD


class PerSampleV2(torch.utils.data.Dataset):
    """The baseline: one transforms.v2 call per image (random parameters per sample, as they should be)."""

    def __init__(self, data: DecodedData) -> None:
        from torchvision.transforms import v2

        self.data = data
        self.tf = v2.Compose([
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.data.images[i])).permute(2, 0, 1)
        return self.tf(img), int(self.data.labels[i])


def rate(batches, limit: int, warmup: int = 3) -> float:
    """Images/s over `limit` batches after `warmup`, consuming each batch's image tensor."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for k, b in enumerate(it):
        x = b["image"] if isinstance(b, dict) else b[0]
        n += x.shape[0]
        if k + 1 >= limit:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=300, help="BatchLoader batches to time")
    ap.add_argument("--baseline-batches", type=int, default=60, help="baseline batches to time")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (the machine may be shared)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")

    with tempfile.TemporaryDirectory() as tmp:
        shared = shared_data_dir()
        if shared is not None and (shared / "cifar10-jpeg.tar.gz").exists():
            t0 = time.perf_counter()
            prepare("cifar10", shared / "cifar10-jpeg.tar.gz", tmp)
            seconds = time.perf_counter() - t0
            print(f"first CIFAR-10 prepare from cifar10-jpeg.tar.gz (60,000 JPEGs): {seconds:.1f} s")
            t0 = time.perf_counter()
            train = load_split("cifar10", "train", tmp)
            print(f"load_split (memmap): {1e3 * (time.perf_counter() - t0):.2f} ms")
        else:
            print("shared data absent: using 50,000 synthetic images")
            make_synthetic(50000, 10)["train"].save(Path(tmp) / "syn")
            train = DecodedData.load(Path(tmp) / "syn")
        assert train.images.shape == (50000, 32, 32, 3)

        x = torch.from_numpy(np.array(train.images[:128]))
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(200):
            random_crop_flip(x, 4, True, g)
        kernel = 200 * 128 / (time.perf_counter() - t0)
        print(f"random_crop_flip kernel (NHWC uint8, batch 128): {kernel:,.0f} img/s")

        aug = BatchAugment(crop_pad=4, flip=True)
        ours = max(rate(BatchLoader(train, 128, augment=aug), args.batches) for _ in range(args.repeats))
        ours_sync = max(
            rate(BatchLoader(train, 128, augment=aug, prefetch=0), args.batches) for _ in range(args.repeats)
        )
        print(f"BatchLoader crop+flip+normalise, batch 128: {ours:,.0f} img/s "
              f"(prefetch off: {ours_sync:,.0f} img/s)")

        ds = PerSampleV2(train)
        base = {}
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(
                ds, batch_size=128, shuffle=True, num_workers=workers, persistent_workers=workers > 0
            )
            base[workers] = max(rate(loader, args.baseline_batches) for _ in range(args.repeats))
            print(f"torchvision.transforms.v2 per-sample DataLoader, num_workers={workers}: "
                  f"{base[workers]:,.0f} img/s")
        best = max(base.values())
        print(f"ratio BatchLoader / best baseline: {ours / best:.1f}x")


if __name__ == "__main__":
    main()
