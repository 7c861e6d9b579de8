"""Data: public formats -> decoded uint8 cache -> fast batched loader with per-sample augmentation.

    prepare("cifar10", "shared/data/cifar10-jpeg.tar.gz")      # once: decode into ~/.cache/kdforge/data/cifar10/
    train = load_split("cifar10", "train")                      # memmap, milliseconds
    loader = BatchLoader(train, 128, augment=BatchAugment(crop_pad=4, flip=True))
    for batch in loader: ...                                    # {"image", "label", "index", **attrs}
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import kdforge.data.protocols  # noqa: F401  (registers the protocol datasets: cifar10s, utkface, celeba)
from kdforge.data.combined import CombinedLoader, DataFree, IndexedDataset
from kdforge.data.decoded import CACHE_FORMAT_VERSION, DecodedData
from kdforge.data.loader import IMAGENET_MEAN, IMAGENET_STD, BatchLoader
from kdforge.data.prepare import default_cache_root, load_split, prepare, shared_data_dir
from kdforge.data.samplers import GroupClassBalancedSampler
from kdforge.data.synthetic import make_synthetic
from kdforge.data.transforms import BatchAugment, normalize, random_crop_flip, resize


def make_grid_image(
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    nrow: int = 8,
) -> Path:
    """Save normalised NCHW float images (as BatchLoader yields them) as one PNG grid at `path`.

    uint8 images (NCHW) are saved as they are. Un-normalises with `mean`/`std` first, so colours are true.
    """
    from torchvision.utils import make_grid, save_image

    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(x.clamp(0, 1), nrow=nrow, padding=2), path)
    return path


__all__ = [
    "CACHE_FORMAT_VERSION", "IMAGENET_MEAN", "IMAGENET_STD", "BatchAugment", "BatchLoader", "CombinedLoader",
    "DataFree", "DecodedData", "GroupClassBalancedSampler", "IndexedDataset",
    "default_cache_root", "load_split", "make_grid_image", "make_synthetic", "normalize", "prepare",
    "random_crop_flip", "resize", "shared_data_dir",
]
