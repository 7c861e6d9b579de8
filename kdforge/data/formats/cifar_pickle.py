"""The official CIFAR-10 / CIFAR-100 "python version" pickles (Krizhevsky 2009), from a directory or a tar.

CIFAR-10:  data_batch_1..5 (train), test_batch, batches.meta (b"label_names")
CIFAR-100: train, test, meta (b"fine_label_names", b"coarse_label_names"); labels = b"fine_labels", and the
           coarse (superclass) label is kept as attribute `coarse_label`.

Each batch is a dict with bytes keys: b"data" (N, 3072) uint8 rows laid out as 1024 R, 1024 G, 1024 B values
of a 32x32 image (row-major), and b"labels" / b"fine_labels". The official archives wrap the files in a top
folder (cifar-10-batches-py/, cifar-100-python/); files are found by name at any depth.

The pickles are read with a restricted unpickler that only builds numpy arrays and plain Python values, so a
tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, iter_files, iter_tar

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
#: Used when batches.meta is absent (e.g. a folder holding only test_batch).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("builtins", "object"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR pickle refers to {module}.{name}, which is not a numpy type")
        return super().find_class(module, name)


def _unpickle(data: bytes, what: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"cannot read CIFAR pickle {what}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR pickle {what} holds a {type(obj).__name__}, not a dict")
    return obj


def _get(d: dict, key: str, what: str) -> Any:
    for k in (key.encode(), key):  # official files have bytes keys; some re-packaged copies use str
        if k in d:
            return d[k]
    keys = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))
    raise ValueError(f"CIFAR pickle {what} has no key {key!r} (keys: {keys})")


def _names(values: list) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _images(d: dict, what: str) -> np.ndarray:
    data = np.asarray(_get(d, "data", what), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR pickle {what}: data has shape {data.shape}, expected (N, 3072)")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def detect_cifar_pickle(source: str | Path) -> str | None:
    """'cifar10' or 'cifar100' when `source` holds CIFAR python pickles, else None (cheap: peeks a tar)."""
    path = check_source(source)
    found: set[str] = set()
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and p.name in CIFAR10_FILES + CIFAR100_FILES:
                found.add(p.name)
    else:
        members = iter_tar(path, want=lambda rel: False)  # names only; a damaged archive is named
        try:
            for k, (_rel, member, _data) in enumerate(members):
                if k >= 32:  # the official archives list their files first; an image tree does not
                    break
                found.add(Path(member.name).name if member.isfile() else "")
        finally:
            members.close()
    if found & set(CIFAR10_FILES):
        return "cifar10"
    if found & set(CIFAR100_FILES):
        return "cifar100"
    return None


def read_cifar_pickle(
    source: str | Path, *, variant: str | None = None, name: str | None = None
) -> dict[str, DecodedData]:
    """Decode CIFAR-10 or CIFAR-100 pickles into `{"train": ..., "test": ...}` (the splits present).

    `variant` ('cifar10' / 'cifar100') is detected from the file names when None. A train split with some
    batches missing is an error that lists the missing batch names.
    """
    path = check_source(source)
    wanted = set(CIFAR10_FILES + CIFAR100_FILES)
    files: dict[str, tuple[str, bytes]] = {}
    for rel, data in iter_files(path, lambda r: r.rsplit("/", 1)[-1] in wanted):
        base = rel.rsplit("/", 1)[-1]
        if base in files:
            raise ValueError(f"CIFAR source {path} holds {base!r} twice: {files[base][0]!r} and {rel!r}")
        files[base] = (rel, data)
    if variant is None:
        variant = "cifar10" if set(files) & set(CIFAR10_FILES) else "cifar100" if files else None
    if variant == "cifar10":
        return _read_cifar10(path, files, name or "cifar10")
    if variant == "cifar100":
        return _read_cifar100(path, files, name or "cifar100")
    if variant is None:
        raise FileNotFoundError(
            f"no CIFAR pickle batches in {path}: expected {', '.join(CIFAR10_FILES)} (CIFAR-10) "
            f"or {', '.join(CIFAR100_FILES)} (CIFAR-100)"
        )
    raise ValueError(f"unknown CIFAR variant {variant!r}; expected 'cifar10' or 'cifar100'")


def _read_cifar10(path: Path, files: dict[str, tuple[str, bytes]], name: str) -> dict[str, DecodedData]:
    present = [b for b in CIFAR10_TRAIN if b in files]
    if present and len(present) < len(CIFAR10_TRAIN):
        missing = [b for b in CIFAR10_TRAIN if b not in files]
        raise FileNotFoundError(f"missing CIFAR-10 batches in {path}: {', '.join(missing)}")
    if not present and "test_batch" not in files:
        expected = ", ".join((*CIFAR10_TRAIN, "test_batch"))
        raise FileNotFoundError(f"missing CIFAR-10 batches in {path}: {expected}")
    if "batches.meta" in files:
        rel, data = files["batches.meta"]
        classes = _names(_get(_unpickle(data, rel), "label_names", rel))
    else:
        classes = list(CIFAR10_CLASSES)
    splits = {"train": list(CIFAR10_TRAIN), "test": ["test_batch"]}
    out = {}
    for split, batches in splits.items():
        if not all(b in files for b in batches):
            continue
        imgs, labels = [], []
        for b in batches:
            rel, data = files[b]
            d = _unpickle(data, rel)
            imgs.append(_images(d, rel))
            labels.append(np.asarray(_get(d, "labels", rel), dtype=np.int64))
        out[split] = DecodedData(
            np.concatenate(imgs), np.concatenate(labels), classes, name=name, source=str(path)
        )
    return out


def _read_cifar100(path: Path, files: dict[str, tuple[str, bytes]], name: str) -> dict[str, DecodedData]:
    missing = [f for f in CIFAR100_FILES if f not in files]
    if "meta" in missing or ("train" in missing and "test" in missing):
        raise FileNotFoundError(f"missing CIFAR-100 files in {path}: {', '.join(missing)}")
    rel, data = files["meta"]
    meta = _unpickle(data, rel)
    classes = _names(_get(meta, "fine_label_names", rel))
    out = {}
    for split in ("train", "test"):
        if split not in files:
            continue
        rel, data = files[split]
        d = _unpickle(data, rel)
        has_coarse = b"coarse_labels" in d or "coarse_labels" in d
        out[split] = DecodedData(
            _images(d, rel),
            np.asarray(_get(d, "fine_labels", rel), dtype=np.int64),
            classes,
            attrs={"coarse_label": np.asarray(_get(d, "coarse_labels", rel))} if has_coarse else {},
            name=name,
            source=str(path),
        )
    return out
