"""Decode chosen image files straight into the rows of preallocated split arrays, resized in the workers.

The face datasets decide their splits from file names and text files alone, so every image's destination
(split, row) is known before any pixel is decoded. Decoding then writes each image, already cropped and
resized, into its row: no full-size copy of the dataset is ever held (CelebA at 218x178 would be 23 GB),
images that no split wants are never decoded, and the number of chunks in flight is bounded, so reading a
tar faster than the decoders keep up does not pile compressed bytes up in memory either. Arrays above
`MEMMAP_BYTES` live in an unlinked temporary file (a memmap), which DecodedData.save streams to the cache.
"""
from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from kdforge.data.formats._archive import iter_files

#: Split arrays larger than this are backed by a temporary file rather than memory.
MEMMAP_BYTES = 1 << 30
CROPS = ("none", "center")
_CHUNK = 64


def scan(
    source: Path, want: Callable[[str], bool], texts: Iterable[str] = ()
) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """One pass over a directory or tar: the relative paths that pass `want` (their bytes are not read), and
    `{basename: (relative path, text)}` for the files whose base name is in `texts`, at any depth.

    Two text files with the same base name are an error naming both, so a stray copy is never used silently.
    """
    wanted = set(texts)
    names: list[str] = []

    def keep(rel: str) -> bool:
        if rel.rsplit("/", 1)[-1] in wanted:
            return True  # read its bytes
        if want(rel):
            names.append(rel)
        return False

    found: dict[str, tuple[str, str]] = {}
    for rel, data in iter_files(source, keep):
        base = rel.rsplit("/", 1)[-1]
        if base in found:
            raise ValueError(f"{source} holds {base!r} twice: {found[base][0]!r} and {rel!r}")
        found[base] = (rel, data.decode("utf-8"))
    return names, found


def allocate(n: int, h: int, w: int) -> np.ndarray:
    """An (n, h, w, 3) uint8 array; a memmap of an already unlinked temporary file when it is large."""
    shape = (n, h, w, 3)
    if n * h * w * 3 <= MEMMAP_BYTES:
        return np.empty(shape, dtype=np.uint8)
    # TemporaryFile has no name on disk: the mapping keeps the space until the array is garbage-collected
    with tempfile.TemporaryFile(prefix="kdforge-decode-") as f:
        return np.memmap(f, dtype=np.uint8, mode="w+", shape=shape)


def _fit(img: torch.Tensor, hw: tuple[int, int] | None, crop: str) -> torch.Tensor:
    """CHW uint8 -> HWC uint8: the central square first when crop == 'center', then resized to `hw`."""
    if crop == "center":
        h, w = img.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[:, top:top + s, left:left + s]
    if hw is not None and tuple(img.shape[-2:]) != hw:
        img = F.interpolate(img[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return img.permute(1, 2, 0)


def _decode(rel: str, data: bytes, where: str) -> torch.Tensor:
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot decode image {rel!r} in {where}: {e}") from e


def decode_into(
    source: Path,
    targets: Mapping[str, tuple[str, int]],
    counts: Mapping[str, int],
    *,
    size: int | tuple[int, int] | None = None,
    crop: str = "none",
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode the files named in `targets` (`{relative path: (split, row)}`) into `{split: (n, H, W, 3)}`.

    `counts[split]` is the number of rows of each split. `crop='center'` takes the central square of each
    image before resizing; `size` (int or (H, W)) is the output size, default the first decoded image's
    (images of another size are then resized to it, antialiased bilinear). A file named in `targets` but
    absent from `source` is an error that counts and names the missing files.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    where = str(source)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()

    def run(chunk: list[tuple[str, bytes]]) -> None:
        for rel, data in chunk:
            split, row = targets[rel]
            out[split][row] = _fit(_decode(rel, data, where), hw, crop).numpy()

    files = iter_files(source, lambda rel: rel in targets)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdforge-decode") as pool:
        pending: collections.deque = collections.deque()
        chunk: list[tuple[str, bytes]] = []
        try:
            for rel, data in files:
                seen.add(rel)
                if not out:  # the first image fixes the size when none is given
                    h, w = hw or tuple(_fit(_decode(rel, data, where), None, crop).shape[:2])
                    hw = (int(h), int(w))
                    out.update({s: allocate(n, *hw) for s, n in counts.items()})
                chunk.append((rel, data))
                if len(chunk) == _CHUNK:
                    pending.append(pool.submit(run, chunk))
                    chunk = []
                while len(pending) > 4 * workers:  # bounded: the reader waits for the decoders
                    pending.popleft().result()
            if chunk:
                pending.append(pool.submit(run, chunk))
            while pending:
                pending.popleft().result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    missing = sorted(set(targets) - seen)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise FileNotFoundError(f"{len(missing)} image(s) named by the dataset's lists are not in {source}: "
                                f"{shown}{' ...' if len(missing) > 5 else ''}")
    if not out:  # no targets at all
        h, w = hw or (0, 0)
        out = {s: np.zeros((n, h, w, 3), dtype=np.uint8) for s, n in counts.items()}
    return out
