"""From a recipe's `data:` section to train/val loaders: decode on first use, then memory-mapped caches.

The cache is checked against `data.source` on every load: when the source exists and its fingerprint differs
from the one the committed cache was made from (another file, files added or removed), the dataset is
prepared again; when the source is absent, the committed cache is used as it is.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
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
    num_groups: int | None = None  # distinct values of the `group` attribute (max + 1), None without one


def _subset(data, n: int | None, seed: int):
    if n is None or n >= len(data):
        return data
    rng = np.random.default_rng(seed)  # fixed per dataset, not per run, so seeds compare on one subset
    return data.subset(np.sort(rng.choice(len(data), size=n, replace=False)))


def _load_split(cfg: Any, name: str, source: str | None, options: dict[str, Any], split: str, role: str) -> Any:
    """Split `split` of dataset `name` from a cache consistent with `source` and builder `options`
    (`role` picks the generated split when name is synthetic)."""
    from kdforge.data.decoded import CACHE_FORMAT_VERSION
    from kdforge.data.prepare import _jsonable, committed_preparation, load_split, prepare, source_fingerprint
    from kdforge.data.synthetic import make_synthetic
    from kdforge.registry import DATASETS

    if name == "synthetic":
        return make_synthetic(cfg.synthetic_train, cfg.synthetic_test, size=cfg.synthetic_size, seed=0,
                              **options)[role]
    root = Path(expand_path(cfg.root))
    source = expand_path(source) if source else None
    stamp = committed_preparation(name, root)
    # a generated dataset (its builder's `generated`, e.g. synthetic_edges) has no source: its options say it all
    generated = name in DATASETS and getattr(DATASETS.get(name), "generated", False)
    # a missing source: prepare names it
    if generated or (source is not None and (Path(source).exists() or stamp is None)):
        wanted = dict(options) if options or generated else (stamp.get("options") or {}) if stamp else {}
        fresh = (stamp is not None and stamp.get("format_version") == CACHE_FORMAT_VERSION
                 and stamp.get("fingerprint") == source_fingerprint(source)
                 and (stamp.get("options") or {}) == _jsonable(wanted))
        if not fresh:  # checked here first, so an up-to-date cache on a read-only disk needs no lock
            # decoded again with the builder the cache was made with (e.g. prepare(format=...)), and the
            # recipe's builder options when it gives some (another skew), else the cache's own
            prepare(name, source, root, format=stamp.get("format") if stamp else None, **wanted)
    return load_split(name, split, root)


def load_splits(cfg: Any) -> tuple[Any, Any]:
    """The decoded train and val splits named by a DataConfig. Training data comes from `train_name`
    (`train_source`) when set, e.g. out-of-domain images, while `name` is only evaluated."""
    train_name = cfg.train_name or cfg.name
    train_source, train_options = ((cfg.train_source, cfg.train_options) if cfg.train_name
                                   else (cfg.source, cfg.options))
    return (_load_split(cfg, train_name, train_source, train_options, cfg.train_split, "train"),
            _load_split(cfg, cfg.name, cfg.source, cfg.options, cfg.val_split, "test"))


def _num_groups(*datasets: Any) -> int | None:
    cols = [d.attrs["group"] for d in datasets if "group" in d.attrs and len(d.attrs["group"])]
    return int(max(int(c.max()) for c in cols)) + 1 if cols else None


def _loader_class(name: str) -> Any:
    """BatchLoader, or the builder's own `loader_class` for data whose samples are not one image (a dataset of
    side-by-side pairs serves `image` and `target` and must crop and flip them together)."""
    from kdforge.data.loader import BatchLoader
    from kdforge.registry import DATASETS

    return getattr(DATASETS.get(name), "loader_class", BatchLoader) if name in DATASETS else BatchLoader


def _train_loader(cfg: Any, train: Any, seed: int, sampler: Any, groups: int | None, rank: int = 0,
                  world_size: int = 1) -> Any:
    from kdforge.data.transforms import BatchAugment

    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is the global batch of {world_size} processes: it must "
                         f"divide evenly among them (e.g. {cfg.batch_size - cfg.batch_size % world_size})")

    if sampler is None and len(train) < cfg.batch_size:
        raise ValueError(
            f"dataset {cfg.train_name or cfg.name!r} split {cfg.train_split!r} has {len(train)} samples"
            f"{' selected' if getattr(cfg, 'train_select', None) else ''}, fewer than batch_size="
            f"{cfg.batch_size}; training drops the last incomplete batch, so an epoch would have no batches: "
            f"lower data.batch_size (or raise data.train_subset)"
        )
    augment = BatchAugment(crop_pad=cfg.crop_pad, flip=cfg.flip, resize=cfg.resize)
    name = cfg.train_name or cfg.name
    return _loader_class(name)(train, cfg.batch_size // world_size, shuffle=True, drop_last=True, augment=augment,
                               mean=cfg.mean, std=cfg.std, seed=seed, sampler=sampler, num_groups=groups, rank=rank,
                               world_size=world_size, **_on_device(cfg, name))


def _on_device(cfg: Any, name: str) -> dict[str, Any]:
    """`device=` for a BatchLoader when data.device asks (a dataset's own loader class builds its batches itself)."""
    from kdforge.data.loader import BatchLoader

    device = getattr(cfg, "device", None)
    if device is None or device == "auto":
        return {}
    if _loader_class(name) is not BatchLoader:
        raise ValueError(f"data.device: dataset {name!r} builds its batches with its own loader "
                         f"({_loader_class(name).__name__}), which keeps its data on the CPU; remove data.device")
    return {"device": device}


def _data_free_bundle(cfg: Any, seed: int, world_size: int = 1) -> DataBundle:
    """`data.data_free_steps`: no training data (DAFL, DFAD make their inputs). The train loader is
    DataFree(data_free_steps, batch_size), carrying the val data's shape, class count and mean/std; the val
    loader is `name`'s as usual."""
    from kdforge.data.combined import DataFree
    from kdforge.data.loader import BatchLoader
    from kdforge.data.transforms import BatchAugment

    val = _subset(_load_split(cfg, cfg.name, cfg.source, cfg.options, cfg.val_split, "test"), cfg.val_subset, 1)
    groups = _num_groups(val)
    val_loader = BatchLoader(val, cfg.eval_batch_size, shuffle=False, drop_last=False, mean=cfg.mean, std=cfg.std,
                             seed=seed, augment=BatchAugment(resize=cfg.resize), num_groups=groups)
    h, w = (cfg.resize, cfg.resize) if cfg.resize else val.image_size
    train = DataFree(cfg.data_free_steps, cfg.batch_size // world_size, image_shape=(3, h, w),
                     num_classes=val.num_classes, mean=tuple(cfg.mean), std=tuple(cfg.std))
    return DataBundle(train, val_loader, val.num_classes, list(val.classes), (3, h, w), groups)


def build_loaders(cfg: Any, *, seed: int = 0, sampler: Any = None, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Train and val BatchLoaders for a DataConfig; `sampler` (e.g. GroupClassBalancedSampler) orders train.
    With `world_size` > 1 the train loader is this rank's shard: `data.batch_size` is the global batch, each rank
    loads batch_size / world_size of it; the val loader is whole on every rank.

    `data.train_select` is not applied here, as it needs the teacher: `select_train` does it (run_recipe calls
    it once the teacher is built)."""
    from kdforge.data.transforms import BatchAugment

    if getattr(cfg, "data_free_steps", None):
        return _data_free_bundle(cfg, seed, world_size)
    if sampler is None and getattr(cfg, "sampler", None):
        from kdforge.data.samplers import build_sampler

        sampler = build_sampler(cfg.sampler)
    train, val = load_splits(cfg)
    train, val = _subset(train, cfg.train_subset, 0), _subset(val, cfg.val_subset, 1)
    if train.num_classes < 2:
        warnings.warn(f"dataset {cfg.name!r} ({cfg.train_split}) has one class ({train.classes[0]!r}): "
                      "its top-1 accuracy is 100 % whatever the model; check data.source", stacklevel=2)
    groups = _num_groups(train, val)  # one count for both, so train and val per-group metrics line up
    train_loader = _train_loader(cfg, train, seed, sampler, groups, rank, world_size)
    val_loader = _loader_class(cfg.name)(val, cfg.eval_batch_size, shuffle=False, drop_last=False, mean=cfg.mean,
                                         std=cfg.std, seed=seed, augment=BatchAugment(resize=cfg.resize),
                                         num_groups=groups, **_on_device(cfg, cfg.name))
    h, w = val_loader.image_shape[1:]
    if train.image_size != val.image_size and not cfg.resize:
        raise ValueError(f"train images ({cfg.train_name or cfg.name}) are {train.image_size} but val images "
                         f"({cfg.name}) are {val.image_size}: set data.resize to give both one size")
    # the class count is the evaluated task's: a student trained on OOD data still predicts `name`'s classes
    return DataBundle(train_loader, val_loader, val.num_classes, list(val.classes), (3, h, w), groups)


def select_train(bundle: DataBundle, cfg: Any, teacher: Any, *, seed: int = 0, device: Any = "cpu",
                 progress: Callable[[str], None] | None = None) -> DataBundle:
    """`bundle` with its train loader over the part of the train split that `cfg.train_select` keeps.

    The teacher (frozen, eval) rates the whole train split (train_name's pool when set) as training will show
    it (data.mean, data.std, data.resize) and kdforge.data.ood picks the samples: `{rule: entropy, k: N}` or
    `{rule: balanced, per_class: N}`. A prepared pool's teacher outputs are cached (see
    kdforge.data.ood.select_ood_subset); a generated (synthetic) one is rated again each time. The selection
    comes first, then `train_subset` (a fixed random subset of the selected samples). The val loader, class
    count and groups stay as they are. Without `train_select` the bundle is returned unchanged.
    """
    if not getattr(cfg, "train_select", None):
        return bundle
    from kdforge.data.ood import RULES, select_from_data, select_ood_subset

    spec = dict(cfg.train_select)
    name = cfg.train_name or cfg.name
    pool, _ = load_splits(cfg)  # the whole train split again (bundle.train may hold a train_subset of it)
    common = {"device": device, "batch_size": cfg.eval_batch_size, "mean": cfg.mean, "std": cfg.std,
              "resize": cfg.resize, "progress": progress}
    if name == "synthetic":  # generated in memory: no preparation to key a cache by
        indices = select_from_data(pool, teacher, spec, **common)
    else:
        size_key = RULES[spec["rule"]]
        indices = select_ood_subset(name, teacher, rule=spec["rule"], root=expand_path(cfg.root),
                                    split=cfg.train_split, **{size_key: spec[size_key]}, **common)
    train = _subset(pool.subset(indices.numpy()), cfg.train_subset, 0)
    loader = _train_loader(cfg, train, seed, bundle.train.sampler, bundle.num_groups)
    return dataclasses.replace(bundle, train=loader)
