"""Decode a public dataset once into `<root>/<name>/<split>/` caches, and load splits from them.

`prepare` is what `kdforge prepare <name> --source PATH` runs. The dataset name picks a builder in
`kdforge.registry.DATASETS` (`(source, **options) -> {split: DecodedData}`); the builder detects the layout
of the source (directory, .tar, .tar.gz, CIFAR pickle batches or a JPEG tree). A finished preparation is
marked by `<root>/<name>/prepared.json` (written last), which records the source path, its size, the options
and the cache format version; a second `prepare` with the same inputs returns at once without decoding.

Paths: the cache root defaults to `$KDFORGE_CACHE/data` (KDFORGE_CACHE: `~/.cache/kdforge`); the shared read-only data
folder is env `KDFORGE_SHARED_DATA`, else `<repo>/../shared/data`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdforge.data.decoded import CACHE_FORMAT_VERSION, DecodedData
from kdforge.data.formats import detect_cifar_pickle, read_cifar_pickle, read_image_folder, read_tiny_imagenet
from kdforge.data.formats._archive import check_source
from kdforge.data.synthetic import make_synthetic
from kdforge.registry import DATASETS, did_you_mean

_DONE = "prepared.json"


def default_cache_root() -> Path:
    """`$KDFORGE_CACHE/data` (KDFORGE_CACHE defaulting to `~/.cache/kdforge`): where recipes and the CLI look too."""
    base = Path(os.environ.get("KDFORGE_CACHE") or Path.home() / ".cache" / "kdforge").expanduser()
    return base / "data"


def shared_data_dir() -> Path | None:
    """The shared public-data folder (env `KDFORGE_SHARED_DATA`, else `<repo>/../shared/data`), or None."""
    env = os.environ.get("KDFORGE_SHARED_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data"
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


# ---------------------------------------------------------------- prepare / load
def _fingerprint(source: str | Path | None) -> dict[str, Any]:
    if source is None:
        return {"source": None, "source_size": None}
    path = check_source(source).resolve()
    size = path.stat().st_size if path.is_file() else None
    return {"source": str(path), "source_size": size}


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
    """Decode dataset `name` from `source` into `<root>/<name>/<split>/` caches; return `<root>/<name>`.

    `format` names the registered builder when it differs from `name` (e.g. `prepare("pets", src,
    format="image_folder")`). An existing cache is reused when it was made from the same source path and
    size, with the same options and cache format version, unless `force`. `progress` receives one-line
    status messages (the CLI prints them).
    """
    builder = DATASETS.get(format or name)
    root = Path(root).expanduser() if root is not None else default_cache_root()
    target = root / name
    fp = {**_fingerprint(source), "format": format or name, "options": _jsonable(options),
          "format_version": CACHE_FORMAT_VERSION}
    done = target / _DONE
    if not force and done.is_file():
        try:
            stamp = json.loads(done.read_text())
        except ValueError:
            stamp = {}
        same = {k: stamp.get(k) for k in fp} == fp
        if same and all((target / s / "meta.json").is_file() for s in stamp["splits"]):
            if progress:
                progress(f"{name}: reusing decoded cache {target}")
            return target
    t0 = time.perf_counter()
    if progress:
        progress(f"{name}: decoding {source} ...")
    splits = builder(source, **options)
    if not splits:
        raise ValueError(f"dataset {name!r}: source {source} gave no splits")
    target.mkdir(parents=True, exist_ok=True)
    if done.exists():
        done.unlink()  # from here on the old cache is invalid until the new one is complete
    for old in target.iterdir():  # splits of an earlier preparation that this one does not produce
        if old.is_dir() and not old.name.startswith(".") and old.name not in splits:
            shutil.rmtree(old)
    for split, data in splits.items():
        data.name = name
        data.save(target / split, extra_meta={k: v for k, v in fp.items() if k != "format_version"})
    seconds = time.perf_counter() - t0
    stamp = {**fp, "splits": sorted(splits), "sizes": {s: len(d) for s, d in splits.items()},
             "seconds": round(seconds, 2)}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, done)
    if progress:
        sizes = ", ".join(f"{s} {len(d)}" for s, d in splits.items())
        progress(f"{name}: decoded {sizes} in {seconds:.1f}s into {target}")
    return target


def load_split(name: str, split: str, root: str | Path | None = None, *, mmap: bool = True) -> DecodedData:
    """Load split `split` of prepared dataset `name` from `<root>/<name>/<split>` (a memmap, milliseconds)."""
    root = Path(root).expanduser() if root is not None else default_cache_root()
    d = root / name / split
    if not (d / "meta.json").is_file():
        hint = f"run `kdforge prepare {name} --source PATH` first"
        base = root / name
        if base.is_dir():
            have = sorted(p.name for p in base.iterdir() if (p / "meta.json").is_file())
            if have:
                raise FileNotFoundError(
                    f"dataset {name!r} has no split {split!r} in {base}{did_you_mean(split, have)} "
                    f"(prepared splits: {', '.join(have)}); to rebuild, {hint}"
                )
        raise FileNotFoundError(f"no decoded cache for dataset {name!r} split {split!r} at {d}; {hint}")
    return DecodedData.load(d, mmap=mmap)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str, sort_keys=True))
