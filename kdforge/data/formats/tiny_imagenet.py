"""Tiny-ImageNet-200 in its official layout (a directory, .tar or .tar.gz):

    tiny-imagenet-200/wnids.txt                      200 WordNet ids, one a line: the class order
    tiny-imagenet-200/words.txt                      wnid<TAB>names (not needed for labels)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     label = the wnid folder
    tiny-imagenet-200/val/images/*.JPEG              label from val/val_annotations.txt
    tiny-imagenet-200/val/val_annotations.txt        file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1

The unlabelled test split is skipped. Splits that are absent (the shared copy has only val) are left out.
Some images are greyscale JPEGs; they are decoded to RGB. Option `size` (e.g. 32) resizes every image
(antialiased bilinear) while decoding, so the cache holds CIFAR-sized images: an out-of-domain pool for a
CIFAR teacher (`kdforge prepare tiny_imagenet --source ... --option size=32`; recipes: `data.train_options`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, decode_stream, is_image, iter_files, natural_key

_TEXT = ("wnids.txt", "words.txt", "val_annotations.txt")


def _kind(rel: str) -> str | None:
    p = rel.split("/")
    if p[-1] in _TEXT:
        return "text"
    if not is_image(rel) or len(p) < 3 or p[-2] != "images":
        return None
    if p[-3] == "val":
        return "val"
    if len(p) >= 4 and p[-4] == "train":
        return "train"
    return None  # test/images: no labels


def read_tiny_imagenet(
    source: str | Path, *, name: str = "tiny_imagenet", size: int | tuple[int, int] | None = None,
    workers: int | None = None,
) -> dict[str, DecodedData]:
    """Decode Tiny-ImageNet into `{"train", "val"}` (the splits present); classes in wnids.txt order.

    `size` (int or (H, W)): the output size, default the source's (64 x 64).
    """
    path = check_source(source)
    hw = (int(size), int(size)) if isinstance(size, int) else (tuple(int(s) for s in size) if size else None)
    if hw is not None and min(hw) < 1:
        raise ValueError(f"tiny_imagenet: size must be a positive side (or (H, W)), got {size!r}")
    texts: dict[str, str] = {}

    def images_only():  # text files are kept aside while the images stream to the decoder
        for rel, data in iter_files(path, lambda r: _kind(r) is not None):
            if _kind(rel) == "text":
                texts[rel.split("/")[-1]] = data.decode("utf-8")
            else:
                yield rel, data

    names, images = decode_stream(images_only(), where=str(path), size=hw, workers=workers)
    if "wnids.txt" not in texts:
        raise FileNotFoundError(f"Tiny-ImageNet source {path} has no wnids.txt (tiny-imagenet-200/wnids.txt)")
    wnids = [w.strip() for w in texts["wnids.txt"].splitlines() if w.strip()]
    class_idx = {w: i for i, w in enumerate(wnids)}
    val_label: dict[str, str] = {}
    if "val_annotations.txt" in texts:
        for line in texts["val_annotations.txt"].splitlines():
            fields = line.strip().split("\t")
            if len(fields) >= 2:
                val_label[fields[0]] = fields[1]

    per_split: dict[str, list[tuple[int, int, str]]] = {}  # split -> (label, index, file name)
    for i, rel in enumerate(names):
        split = _kind(rel)
        p = rel.split("/")
        if split == "train":
            wnid = p[-3]
        else:
            if not val_label:
                raise FileNotFoundError(f"Tiny-ImageNet source {path}: val images but no val_annotations.txt")
            if p[-1] not in val_label:
                raise ValueError(f"val image {rel!r} in {path} has no line in val_annotations.txt")
            wnid = val_label[p[-1]]
        if wnid not in class_idx:
            raise ValueError(f"image {rel!r} in {path} has class {wnid!r}, which is not in wnids.txt")
        per_split.setdefault(str(split), []).append((class_idx[wnid], i, p[-1]))
    if not per_split:
        raise ValueError(f"no train/<wnid>/images/ or val/images/ JPEGs found in Tiny-ImageNet source {path}")

    out = {}
    for split, rows in sorted(per_split.items()):
        # train: by class then file; val: by file name (its official order val_0, val_1, ...)
        if split == "train":
            rows.sort(key=lambda r: (r[0], natural_key(r[2])))
        else:
            rows.sort(key=lambda r: natural_key(r[2]))
        out[split] = DecodedData(
            images=images[np.asarray([r[1] for r in rows], dtype=np.int64)],
            labels=np.asarray([r[0] for r in rows], dtype=np.int64),
            classes=wnids,
            name=name,
            source=str(path),
        )
    return out
