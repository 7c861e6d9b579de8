"""Class-per-folder image trees: `<root>/<split>/<class>/*.jpg|png`, or `<root>/<class>/*` (split "all").

Given as a directory, a .tar or a .tar.gz (streamed with tarfile, never extracted to disk). Classes are the
sorted class-folder names, shared by all splits (a split that lacks a class still indexes the same way).
Samples of a split are ordered by class folder, then file name in natural order (2.jpg before 10.jpg), so the
result does not depend on the order of members in an archive.

Images whose size differs from the first one decoded (or from `size`, when given) are RESIZED to it with
antialiased bilinear interpolation, not rejected: public trees often hold a few odd-sized files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, decode_stream, is_image, iter_files, natural_key

#: Folder names taken as a split level even when a tree holds only one of them.
KNOWN_SPLITS = ("train", "test", "val", "valid", "validation", "all")


def read_image_folder(
    source: str | Path,
    *,
    name: str = "image_folder",
    size: int | tuple[int, int] | None = None,
    has_splits: bool | None = None,
    workers: int | None = None,
) -> dict[str, DecodedData]:
    """Decode a class-per-folder image tree into `{split: DecodedData}`.

    The split level is detected: the folder above the class folders is a split when its name differs
    between images (train/test) or is one of KNOWN_SPLITS; otherwise the tree has no splits and the result
    is `{"all": ...}`. `has_splits` overrides the detection. `size` (int or (H, W)) fixes the output size.
    """
    path = check_source(source)
    hw = (size, size) if isinstance(size, int) else size
    names, images = decode_stream(iter_files(path, is_image), where=str(path), size=hw, workers=workers)
    if not names:
        raise ValueError(f"no .jpg/.jpeg/.png images found in {path}")
    parts = [n.split("/") for n in names]
    depth = len(parts[0])
    for n, p in zip(names, parts):
        if len(p) != depth:
            raise ValueError(
                f"mixed folder depths in {path}: {names[0]!r} vs {n!r}; "
                "expected <root>/<split>/<class>/<image> or <root>/<class>/<image> for every image"
            )
    if depth < 2:
        raise ValueError(f"image {names[0]!r} in {path} is not inside a class folder")
    cls_col = depth - 2
    if has_splits is None:
        has_splits = False
        if depth >= 3:
            prefixes = {tuple(p[: depth - 3]) for p in parts}
            split_names = {p[depth - 3] for p in parts}
            has_splits = len(prefixes) == 1 and (
                len(split_names) > 1 or next(iter(split_names)).lower() in KNOWN_SPLITS
            )
    if has_splits and depth < 3:
        raise ValueError(f"has_splits=True but {names[0]!r} in {path} has no <split>/<class>/ folders")
    root_len = depth - 3 if has_splits else depth - 2
    roots = {tuple(p[:root_len]) for p in parts}
    if len(roots) > 1:
        a, b = sorted(roots)[:2]
        raise ValueError(
            f"images in {path} lie under different top folders {'/'.join(a)!r} and {'/'.join(b)!r}; "
            "expected one class-per-folder tree"
        )

    classes = sorted({p[cls_col] for p in parts}, key=natural_key)
    class_idx = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[int]] = {}
    for i, p in enumerate(parts):
        splits.setdefault(p[depth - 3] if has_splits else "all", []).append(i)
    out = {}
    for split, idx in sorted(splits.items()):
        idx.sort(key=lambda i: (class_idx[parts[i][cls_col]], natural_key(parts[i][-1])))
        sel = np.asarray(idx, dtype=np.int64)
        out[split] = DecodedData(
            images=images[sel],
            labels=np.asarray([class_idx[parts[i][cls_col]] for i in idx], dtype=np.int64),
            classes=classes,
            name=name,
            source=str(path),
        )
    return out
