"""Shared plumbing for the format readers: walk a directory or stream a tar, and decode images in threads.

Archives are read member by member with `tarfile` in streaming mode (no extraction to disk, one pass over a
.tar.gz), and image bytes are decoded by `torchvision.io.decode_image` in a thread pool while the tar is
still being read: decoding releases the GIL, so gunzip and decoding overlap.
"""
from __future__ import annotations

import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not a kdforge dependency;
# decode_image still works and is what this module needs, so that one message is silenced (only it).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_CHUNK = 512  # images per decode task: large enough to amortise the pool's per-task cost


def is_tar(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")))


def check_source(source: str | Path | None) -> Path:
    """The source as a Path; a clear error naming it when it does not exist."""
    if source is None or str(source) == "":
        raise ValueError("no dataset source given: pass a directory, .tar or .tar.gz (--source PATH)")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset source not found: {path}")
    if not (path.is_dir() or is_tar(path)):
        raise ValueError(f"dataset source {path} is neither a directory nor a .tar/.tar.gz archive")
    return path


def iter_files(source: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield `(relative posix path, bytes)` for each regular file whose path passes `want`.

    A directory is walked in sorted order; a tar is streamed in archive order. Paths are relative to the
    directory (or the archive root), without a leading './'. Hidden files (e.g. .DS_Store, ._x) are skipped.
    """
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = Path(dirpath) / fn
                rel = full.relative_to(source).as_posix()
                if want(rel):
                    yield rel, full.read_bytes()
        return
    with tarfile.open(source, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            rel = member.name[2:] if member.name.startswith("./") else member.name
            if rel.rsplit("/", 1)[-1].startswith(".") or not want(rel):
                continue
            f = tf.extractfile(member)
            if f is not None:
                yield rel, f.read()


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and not path.rsplit("/", 1)[-1].startswith(".")


def _decode_chunk(items: list[tuple[str, bytes]], where: str) -> list[torch.Tensor] | torch.Tensor:
    """Decode a chunk to HWC tensors; stacked to (n, H, W, 3) here, in the worker, when all sizes agree."""
    out = []
    for name, data in items:
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot decode image {name!r} in {where}: {e}") from e
        out.append(img.permute(1, 2, 0))
    if all(o.shape == out[0].shape for o in out):
        return torch.stack(out)
    return out


def decode_stream(
    files: Iterable[tuple[str, bytes]],
    *,
    where: str,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Decode `(name, bytes)` pairs with a thread pool, as they arrive; return names and (N, H, W, 3) uint8.

    Images whose size differs from `size` (default: the first image's size) are resized to it with
    antialiased bilinear interpolation. `where` names the source in decode errors.
    """
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    names: list[str] = []
    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdforge-decode") as pool:
        chunk: list[tuple[str, bytes]] = []
        for name, data in files:
            names.append(name)
            chunk.append((name, data))
            if len(chunk) == _CHUNK:
                futures.append(pool.submit(_decode_chunk, chunk, where))
                chunk = []
        if chunk:
            futures.append(pool.submit(_decode_chunk, chunk, where))
        try:
            parts = [fut.result() for fut in futures]  # re-raises the first decode error, naming the file
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    if not names:
        return names, np.zeros((0, *(size or (0, 0)), 3), dtype=np.uint8)
    first = parts[0][0]  # a list of HWC images or a stacked (n, H, W, 3) tensor
    h, w = size or (int(first.shape[0]), int(first.shape[1]))
    out = np.empty((len(names), h, w, 3), dtype=np.uint8)
    pos = 0
    for part in parts:
        if isinstance(part, torch.Tensor) and tuple(part.shape[1:3]) == (h, w):
            out[pos:pos + len(part)] = part.numpy()
            pos += len(part)
            continue
        for img in part:
            if tuple(img.shape[:2]) != (h, w):
                img = F.interpolate(img.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", antialias=True)
                img = img[0].permute(1, 2, 0)
            out[pos] = img.numpy()
            pos += 1
    return names, out


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically: 'img2' < 'img10'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)
