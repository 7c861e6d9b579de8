"""From a recipe's `data:` section to train/val loaders: decode on first use, then memory-mapped caches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.config import expand_path


@dataclass
class DataBundle:
    train: Any  # BatchLoader
    val: Any
    num_classes: int
    classes: list[str]
    image_shape: tuple[int, int, int]


def _subset(data, n: int | None, seed: int):
    if n is None or n >= len(data):
        return data
    rng = np.random.default_rng(seed)  # fixed per dataset, not per run, so seeds compare on one subset
    return data.subset(np.sort(rng.choice(len(data), size=n, replace=False)))


def load_splits(cfg: Any) -> tuple[Any, Any]:
    """The decoded train and val splits named by a DataConfig (prepared from `source` when missing)."""
    from kdforge.data.prepare import load_split, prepare
    from kdforge.data.synthetic import make_synthetic

    if cfg.name == "synthetic":
        splits = make_synthetic(cfg.synthetic_train, cfg.synthetic_test, size=cfg.synthetic_size, seed=0)
        return splits["train"], splits["test"]
    root = Path(expand_path(cfg.root))
    try:
        return load_split(cfg.name, cfg.train_split, root), load_split(cfg.name, cfg.val_split, root)
    except FileNotFoundError:
        if not cfg.source:
            raise
    prepare(cfg.name, expand_path(cfg.source), root)
    return load_split(cfg.name, cfg.train_split, root), load_split(cfg.name, cfg.val_split, root)


def build_loaders(cfg: Any, *, seed: int = 0) -> DataBundle:
    from kdforge.data.loader import BatchLoader
    from kdforge.data.transforms import BatchAugment

    train, val = load_splits(cfg)
    train, val = _subset(train, cfg.train_subset, 0), _subset(val, cfg.val_subset, 1)
    augment = BatchAugment(crop_pad=cfg.crop_pad, flip=cfg.flip, resize=cfg.resize)
    train_loader = BatchLoader(train, cfg.batch_size, shuffle=True, drop_last=True, augment=augment,
                               mean=cfg.mean, std=cfg.std, seed=seed)
    val_loader = BatchLoader(val, cfg.eval_batch_size, shuffle=False, drop_last=False, mean=cfg.mean, std=cfg.std,
                             seed=seed, augment=BatchAugment(resize=cfg.resize))
    h, w = (cfg.resize, cfg.resize) if cfg.resize else train.image_size
    return DataBundle(train_loader, val_loader, train.num_classes, list(train.classes), (3, h, w))
