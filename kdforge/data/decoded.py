"""`DecodedData`: a decoded image-classification split, and its on-disk uint8 cache.

Every public format is decoded once into this shape (uint8 NHWC images, int64 labels, class names and
extra per-sample integer attributes such as a fairness group), so training never touches JPEG, pickle or
tar again: loading a cache is an `np.memmap`, which takes milliseconds whatever the dataset size.

On-disk layout of one split (a directory):

    images.u8        raw bytes, C order, shape meta["shape"] = (N, H, W, 3)
    labels.npy       int64 (N,)
    attrs_<key>.npy  int64 (N,), one per attribute
    meta.json        shape, classes, attrs, name, source, format_version

The directory is written under a temporary name beside the target and renamed into place only when every
file is complete, so a crash (or a full disk) never leaves a half-written cache that would later load.
Temporary names carry the writer's pid (`.<name>.tmp-<pid>-<hex8>`, `.<name>.old-<pid>-<hex8>`), so the
leftovers of a killed writer can be told from work in progress and removed (`remove_stale_temps`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Bumped whenever the on-disk layout changes; a cache with another version is decoded again.
CACHE_FORMAT_VERSION = 1

_META = "meta.json"
_IMAGES = "images.u8"
_LABELS = "labels.npy"
#: kdforge's own temporary names, and only those: `.<name>.tmp-<pid>-<8 hex>` and `.<name>.old-<pid>-<8 hex>`.
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


@dataclass
class DecodedData:
    """Decoded images `(N, H, W, 3)` uint8, labels `(N,)` int64, class names and per-sample attributes.

    `attrs` holds extra integer columns that travel with each sample into batches (e.g. `group` for
    fairness metrics, `coarse_label` for CIFAR-100). `source` records where the data was decoded from.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"dataset {self.name!r}: images must be uint8 (N, H, W, 3), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = len(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (n,):
            raise ValueError(f"dataset {self.name!r}: labels shape {self.labels.shape} != ({n},)")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"dataset {self.name!r}: labels span [{self.labels.min()}, {self.labels.max()}] "
                f"but there are {len(self.classes)} classes"
            )
        self.classes = [str(c) for c in self.classes]
        for key, col in list(self.attrs.items()):
            col = np.asarray(col, dtype=np.int64)
            if col.shape != (n,):
                raise ValueError(f"dataset {self.name!r}: attribute {key!r} is {col.shape}, not ({n},)")
            if not key.isidentifier():
                raise ValueError(f"dataset {self.name!r}: attribute name {key!r} must be an identifier")
            self.attrs[key] = col

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n, h, w, _ = self.images.shape
        attrs = f", attrs={sorted(self.attrs)}" if self.attrs else ""
        return f"DecodedData({self.name!r}, n={n}, size={h}x{w}, classes={len(self.classes)}{attrs})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray) -> DecodedData:
        """A new in-memory `DecodedData` with the samples at `indices` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"dataset {self.name!r}: subset index out of range for {len(self)} samples")
        return DecodedData(
            images=np.ascontiguousarray(self.images[idx]),
            labels=self.labels[idx].copy(),
            classes=list(self.classes),
            attrs={k: v[idx].copy() for k, v in self.attrs.items()},
            name=self.name,
            source=self.source,
        )

    def class_counts(self) -> np.ndarray:
        """Number of samples per class, `(num_classes,)` int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    # ------------------------------------------------------------------ cache
    def save(self, directory: str | Path, *, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the cache to `directory` atomically (temp dir + rename); replaces an existing cache.

        `extra_meta` is stored in meta.json (prepare() records the source fingerprint there).
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / temp_name(target.name)
        tmp.mkdir()
        try:
            with open(tmp / _IMAGES, "wb") as f:
                # Chunked so a memmap source is streamed rather than copied into memory at once.
                step = max(1, (64 << 20) // max(1, int(np.prod(self.images.shape[1:]))))
                for start in range(0, len(self), step):
                    f.write(np.ascontiguousarray(self.images[start:start + step]).tobytes())
                f.flush()
                os.fsync(f.fileno())
            np.save(tmp / _LABELS, self.labels)
            for key, col in self.attrs.items():
                np.save(tmp / f"attrs_{key}.npy", col)
            meta = {
                "format_version": CACHE_FORMAT_VERSION,
                "name": self.name,
                "shape": [int(s) for s in self.images.shape],
                "classes": self.classes,
                "attrs": sorted(self.attrs),
                "source": self.source,
                **(extra_meta or {}),
            }
            # meta.json last: a directory without it is never a cache, even before the rename.
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> DecodedData:
        """Load a cache written by `save`; images are a read-only memmap unless `mmap=False`."""
        d = Path(directory)
        meta = read_meta(d)
        shape = tuple(meta["shape"])
        img_path = d / _IMAGES
        expected = int(np.prod(shape))
        actual = img_path.stat().st_size if img_path.exists() else -1
        if actual != expected:
            raise ValueError(f"corrupt cache {d}: {_IMAGES} has {actual} bytes, not {expected} ({shape})")
        if mmap and expected > 0:
            images = np.memmap(img_path, dtype=np.uint8, mode="r", shape=shape)
        else:
            images = np.fromfile(img_path, dtype=np.uint8).reshape(shape)
        attrs = {k: np.load(d / f"attrs_{k}.npy") for k in meta.get("attrs", [])}
        return cls(
            images=images,
            labels=np.load(d / _LABELS),
            classes=list(meta["classes"]),
            attrs=attrs,
            name=meta.get("name", ""),
            source=meta.get("source", ""),
        )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a cache directory; a clear error when the directory is not a cache."""
    d = Path(directory)
    path = d / _META
    if not path.is_file():
        what = "does not exist" if not d.exists() else f"has no {_META}"
        raise FileNotFoundError(f"not a kdforge decoded cache: {d} {what}")
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"cache {d} has format version {version}, this kdforge reads {CACHE_FORMAT_VERSION}; "
            "prepare it again with force=True"
        )
    return meta


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished `src` to `dst`, replacing any old `dst` with only renames on the way."""
    old = None
    if dst.exists():
        old = dst.parent / temp_name(dst.name, "old")
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)  # put the previous cache back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_name(base: str, kind: str = "tmp") -> str:
    """A temporary name for `base` that says who writes it: `.<base>.<kind>-<pid>-<8 hex>`."""
    return f".{base}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell (e.g. on Windows): keep it
    return True


def remove_stale_temps(folder: str | Path, *, include_own: bool = False) -> list[Path]:
    """Remove the temporary files and folders that dead kdforge writers left directly in `folder`.

    Only names of the form `temp_name` makes are touched, and only when the pid in the name is no longer
    running (or is this process, with `include_own`, for a caller that knows it has nothing in progress
    there); a replaced copy (`.old-`) only once its replacement is in place. Returns what was removed.
    """
    removed = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for entry in d.iterdir():
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        pid = int(m["pid"])
        if _pid_alive(pid) and not (include_own and pid == os.getpid()):
            continue
        if m["kind"] == "old" and not (d / m["base"]).exists():
            continue  # killed between the two renames of _replace_dir: this is the only copy left
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
