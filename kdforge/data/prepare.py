"""Decode a public dataset once into a cache under `<root>/<name>/`, and load splits from it.

`prepare` is what `kdforge prepare <name> --source PATH` runs. The dataset name picks a builder in
`kdforge.registry.DATASETS` (`(source, **options) -> {split: DecodedData}`); the builder detects the layout
of the source (directory, .tar, .tar.gz, CIFAR pickle batches or a JPEG tree).

On disk, one preparation is one generation folder, committed by one atomic rename of a pointer:

    <root>/<name>/prepared.json           the pointer: generation, splits, sizes, source fingerprint, options
    <root>/<name>/gen-<time>-<hex>/<split>/   the splits of that generation (see kdforge.data.decoded)

All splits are written into a fresh generation (under a temporary name) and `prepared.json` is replaced
only when every split is complete, so a preparation killed at any point leaves the previous complete cache
or the new complete cache, never a mix; `load_split` loads only splits of the committed generation. The
source's fingerprint (a file: size, mtime and a hash of its first and last MiB; a directory: a hash of the
relative paths, sizes and mtimes of its files) is stored in the pointer, so a cache is reused only for the
same source, options and cache format. Temporary folders of killed preparations are removed by the next one.

Paths: the cache root defaults to `$KDFORGE_CACHE/data` (KDFORGE_CACHE: `~/.cache/kdforge`); the shared
read-only data folder is env `KDFORGE_SHARED_DATA`, else `<repo>/../shared/data` (both from kdforge.paths).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdforge.data.decoded import CACHE_FORMAT_VERSION, DecodedData, read_meta, remove_stale_temps, temp_name
from kdforge.data.formats import detect_cifar_pickle, read_cifar_pickle, read_image_folder, read_tiny_imagenet
from kdforge.data.formats._archive import check_source
from kdforge.data.synthetic import make_synthetic
from kdforge.paths import default_cache_root, default_shared_data
from kdforge.registry import DATASETS, did_you_mean

_DONE = "prepared.json"
_LOCK = ".prepare.lock"
_GEN = "gen-"
_MIB = 1 << 20


class UncommittedCacheError(FileNotFoundError):
    """A cache folder holds splits that no committed preparation names (interrupted, or an older layout)."""


def shared_data_dir() -> Path | None:
    """The shared public-data folder (env `KDFORGE_SHARED_DATA`, else `<repo>/../shared/data`), or None."""
    path = default_shared_data()
    return path if path.is_dir() else None


# ---------------------------------------------------------------- registered builders
@DATASETS.register("cifar10")
def cifar10(source: str | Path, **options: Any) -> dict[str, DecodedData]:
    """CIFAR-10 from the official pickles (dir or cifar-10-python.tar.gz) or a JPEG class-folder tree."""
    if detect_cifar_pickle(source) == "cifar10":
        return read_cifar_pickle(source, variant="cifar10", name="cifar10")
    return _checked_folder(source, "cifar10", 10, **options)


@DATASETS.register("cifar100")
def cifar100(source: str | Path, **options: Any) -> dict[str, DecodedData]:
    """CIFAR-100 (fine labels; attribute `coarse_label`) from the official pickles or a class-folder tree."""
    if detect_cifar_pickle(source) == "cifar100":
        return read_cifar_pickle(source, variant="cifar100", name="cifar100")
    return _checked_folder(source, "cifar100", 100, **options)


@DATASETS.register("tiny_imagenet")
def tiny_imagenet(source: str | Path, **options: Any) -> dict[str, DecodedData]:
    """Tiny-ImageNet-200 in its official layout (dir, .tar or .tar.gz)."""
    return read_tiny_imagenet(source, name="tiny_imagenet", **options)


@DATASETS.register("image_folder")
def image_folder(source: str | Path, **options: Any) -> dict[str, DecodedData]:
    """Any `<root>/<split>/<class>/*.jpg|png` tree (dir, .tar or .tar.gz); options go to read_image_folder."""
    return read_image_folder(source, **options)


@DATASETS.register("synthetic")
def synthetic(source: str | Path | None = None, **options: Any) -> dict[str, DecodedData]:
    """The generated demo dataset; `source` is ignored. Options: n_train (10000), n_test (2000), num_classes,
    size, seed, group_bias (see make_synthetic)."""
    options.setdefault("n_train", 10000)
    options.setdefault("n_test", 2000)
    return make_synthetic(**options)


def _checked_folder(source: str | Path, name: str, n: int, **options: Any) -> dict:
    out = read_image_folder(source, name=name, **options)
    got = next(iter(out.values())).num_classes
    if got != n:
        raise ValueError(f"{name} source {source} has {got} class folders, expected {n}")
    return out


# ---------------------------------------------------------------- source fingerprints
def source_fingerprint(source: str | Path | None) -> dict[str, Any]:
    """What identifies the contents of `source` cheaply, without reading it all.

    A file: size, mtime and a SHA-256 of its first and last MiB (a re-download or a truncated copy differs).
    A directory: file count, total bytes and a SHA-256 of every file's relative path, size and mtime (files
    added, removed or rewritten differ); hidden names are skipped, as the readers skip them.
    """
    if source is None:
        return {"kind": "none"}
    path = check_source(source).resolve()
    if path.is_file():
        st = path.stat()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(_MIB))
            if st.st_size > _MIB:
                f.seek(max(_MIB, st.st_size - _MIB))
                h.update(f.read())
        return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ends_sha256": h.hexdigest()}
    h = hashlib.sha256()
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(path).as_posix()
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            st = os.stat(os.path.join(dirpath, fn))
            h.update(f"{rel_dir}/{fn}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files, total = files + 1, total + st.st_size
    return {"kind": "directory", "files": files, "bytes": total, "manifest_sha256": h.hexdigest()}


# ---------------------------------------------------------------- the committed preparation
def committed_preparation(name: str, root: str | Path | None = None) -> dict[str, Any] | None:
    """The pointer (`prepared.json`) of dataset `name` when it names a complete generation, else None."""
    base = _root(root) / name
    try:
        stamp = json.loads((base / _DONE).read_text())
    except (OSError, ValueError):
        return None
    gen = stamp.get("generation") if isinstance(stamp, dict) else None
    if not isinstance(gen, str) or not gen.startswith(_GEN) or not isinstance(stamp.get("splits"), list):
        return None  # missing, unreadable, or written by a kdforge without generations
    if not all((base / gen / s / "meta.json").is_file() for s in stamp["splits"]):
        return None
    return stamp


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One preparation of a dataset at a time (DDP ranks, two shells); a no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / _LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_pointer(base: Path, stamp: dict[str, Any]) -> None:
    tmp = base / temp_name(_DONE)
    with open(tmp, "w") as f:
        f.write(json.dumps(stamp, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, base / _DONE)  # the commit: readers see the old pointer or the new one


def _remove_superseded(base: Path, keep: str) -> None:
    """Generations other than `keep`, and split folders of the layout before generations."""
    for entry in base.iterdir():
        if not entry.is_dir() or entry.is_symlink() or entry.name == keep:
            continue
        if entry.name.startswith(_GEN) or (entry / "meta.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)


def _root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else default_cache_root()


# ---------------------------------------------------------------- prepare / load
def prepare(
    name: str,
    source: str | Path | None,
    root: str | Path | None = None,
    *,
    force: bool = False,
    format: str | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Decode dataset `name` from `source` into a committed cache under `<root>/<name>`; return that folder.

    `format` names the registered builder when it differs from `name` (e.g. `prepare("pets", src,
    format="image_folder")`). The committed cache is reused when it was made from a source with the same
    fingerprint, with the same builder, options and cache format version, unless `force`. A truncated or
    corrupt archive raises a ValueError naming it, and the previous cache (if any) stays as it was.
    `progress` receives one-line status messages (the CLI prints them).
    """
    builder = DATASETS.get(format or name)
    base = _root(root) / name
    want = {"format": format or name, "options": _jsonable(options), "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": source_fingerprint(source)}
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base):
        stamp = committed_preparation(name, base.parent)
        if not force and stamp is not None and all(stamp.get(k) == v for k, v in want.items()):
            if progress:
                progress(f"{name}: reusing decoded cache {base / stamp['generation']}")
            return base
        # under the lock nothing of ours is in progress here, so even our own pid's leftovers are stale
        stale = remove_stale_temps(base, include_own=True)
        if stale and progress:
            progress(f"{name}: removed {len(stale)} temporary folder(s) of interrupted preparations")
        t0 = time.perf_counter()
        if progress:
            progress(f"{name}: decoding {source} ...")
        splits = builder(source, **options)
        if not splits:
            raise ValueError(f"dataset {name!r}: source {source} gave no splits")
        gen = f"{_GEN}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        work = base / temp_name(gen)
        work.mkdir()
        try:
            for split, data in splits.items():
                data.name = name
                data.save(work / split, extra_meta={**want, "generation": gen})
            os.rename(work, base / gen)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        source_path = None if source is None else str(Path(source).expanduser().resolve())
        _write_pointer(base, {**want, "generation": gen, "source": source_path, "splits": sorted(splits),
                              "sizes": {s: len(d) for s, d in splits.items()}, "seconds": round(seconds, 2)})
        _remove_superseded(base, keep=gen)
    if progress:
        sizes = ", ".join(f"{s} {len(d)}" for s, d in splits.items())
        progress(f"{name}: decoded {sizes} in {seconds:.1f}s into {base / gen}")
    return base


def load_split(name: str, split: str, root: str | Path | None = None, *, mmap: bool = True) -> DecodedData:
    """Load split `split` of the committed preparation of dataset `name` (a memmap, milliseconds).

    A split that no committed preparation names is refused (UncommittedCacheError, a FileNotFoundError).
    """
    base = _root(root) / name
    stamp = committed_preparation(name, base.parent)
    if stamp is None:
        if base.is_dir() and any(p.is_dir() and p.name != _LOCK for p in base.iterdir()):
            raise UncommittedCacheError(
                f"decoded cache {base} holds no committed preparation of dataset {name!r} (a preparation was "
                f"interrupted, or the cache predates this kdforge); re-run `kdforge prepare {name} --source PATH "
                "--force`"
            )
        raise FileNotFoundError(
            f"no decoded cache for dataset {name!r} split {split!r} at {base}; "
            f"run `kdforge prepare {name} --source PATH` first"
        )
    have = list(stamp["splits"])
    if split not in have:
        raise FileNotFoundError(
            f"dataset {name!r} has no split {split!r} in {base}{did_you_mean(split, have)} "
            f"(prepared splits: {', '.join(have)}); to rebuild, run `kdforge prepare {name} --source PATH --force`"
        )
    d = base / stamp["generation"] / split
    if read_meta(d).get("generation") != stamp["generation"]:
        raise UncommittedCacheError(
            f"split {split!r} in {d} is not part of the committed preparation {stamp['generation']}; "
            f"re-run `kdforge prepare {name} --source PATH --force`"
        )
    return DecodedData.load(d, mmap=mmap)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str, sort_keys=True))

