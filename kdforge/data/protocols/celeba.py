"""CelebA with a binary target attribute and a binary group, as MFD (Jung et al., CVPR 2021) uses it.

target: one of the 40 attributes by name (default Attractive, as the paper); group: another (default Male:
    0 female, 1 male). Values -1/1 become 0/1, as the official code does.
splits: the official partition (list_eval_partition.txt): train (0), valid (1), test (2). The test split is
    balanced as the official code does (data_handler/celeba.py, `_balance_test_data`): every (group, target)
    cell is cut to the size of the smallest, keeping its first files in file order; with `seed` set, a
    seeded random choice of that many per cell instead (the paper's text says "randomly taking").
images: official 178 x 218 (W x H). `crop='none'` (default) resizes the whole image to `size` x `size` as
    the official test transform `Resize((size, size))` does; `crop='center'` takes the central 178 x 178
    square first (no squashing). `size` defaults to 176, the paper's input; `size=None` keeps 218 x 178.
    Large splits are decoded into a temporary file-backed array, so memory stays small at any size.

The record (options, rule, per-cell counts, the balanced test files) is `protocol.json` beside each split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, is_image
from kdforge.data.formats._decode_into import CROPS, decode_into, scan
from kdforge.data.formats.celeba import (
    CELEBA_ATTR_FILE,
    CELEBA_IMAGE_DIR,
    CELEBA_PARTITION_FILE,
    CELEBA_PARTITIONS,
    parse_celeba_attrs,
    parse_celeba_partition,
)
from kdforge.data.protocols.record import ProtocolData
from kdforge.registry import DATASETS, did_you_mean

VERSION = 1
REFERENCE = ("CelebA (Liu et al., ICCV 2015), official partition; test balancing of MFD (Jung et al., CVPR 2021) "
             "and its official code (data_handler/celeba.py)")


def _attr_index(name: str, names: list[str], what: str) -> int:
    if name not in names:
        raise ValueError(f"celeba: unknown {what} attribute {name!r}{did_you_mean(name, names)} "
                         f"(attributes: {', '.join(names)})")
    return names.index(name)


def balance_cells(target: np.ndarray, group: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Rows that keep the same number of samples, the smallest cell's, in every (group, target) cell.

    seed None: the first rows of each cell (the official code); else a seeded random choice per cell.
    Returned in ascending row order.
    """
    cells = np.asarray(group, dtype=np.int64) * 2 + np.asarray(target, dtype=np.int64)
    present = [np.flatnonzero(cells == c) for c in range(4)]
    m = min(len(rows) for rows in present)
    if m == 0:
        empty = [f"(group {c // 2}, target {c % 2})" for c, rows in enumerate(present) if len(rows) == 0]
        raise ValueError(f"celeba: cannot balance the test set, cell {' and '.join(empty)} has no images")
    rng = None if seed is None else np.random.default_rng(int(seed))
    keep = [rows[:m] if rng is None else rng.choice(rows, size=m, replace=False) for rows in present]
    return np.sort(np.concatenate(keep))


@DATASETS.register("celeba")
def celeba(
    source: str | Path, *, target: str = "Attractive", group: str = "Male", size: int | None = 176,
    crop: str = "none", seed: int | None = None, workers: int | None = None,
) -> dict[str, DecodedData]:
    """CelebA from its official layout (dir, .tar, .tar.gz): train, valid and a balanced test; see module."""
    path = check_source(source)
    if crop not in CROPS:
        raise ValueError(f"celeba: crop must be one of {', '.join(CROPS)}, got {crop!r}")

    def aligned(rel: str) -> bool:  # only img_align_celeba/: the in-the-wild images share the file names
        parts = rel.split("/")
        return len(parts) >= 2 and parts[-2] == CELEBA_IMAGE_DIR and is_image(rel)

    rels, texts = scan(path, aligned, (CELEBA_ATTR_FILE, CELEBA_PARTITION_FILE))
    absent = [f for f in (CELEBA_ATTR_FILE, CELEBA_PARTITION_FILE) if f not in texts]
    if absent:
        raise FileNotFoundError(f"CelebA source {path} has no {' and no '.join(absent)}")
    names, files, table = parse_celeba_attrs(texts[CELEBA_ATTR_FILE][1], texts[CELEBA_ATTR_FILE][0])
    partition = parse_celeba_partition(texts[CELEBA_PARTITION_FILE][1], texts[CELEBA_PARTITION_FILE][0])
    t, g = _attr_index(target, names, "target"), _attr_index(group, names, "group")
    if t == g:
        raise ValueError(f"celeba: the target and the group are both {target!r}")
    unpartitioned = [f for f in files if f not in partition]
    if unpartitioned:
        raise ValueError(f"celeba: {len(unpartitioned)} image(s) of {CELEBA_ATTR_FILE} are not in "
                         f"{CELEBA_PARTITION_FILE}, e.g. {unpartitioned[0]!r}")
    rel_of: dict[str, str] = {}
    for rel in rels:
        base = rel.rsplit("/", 1)[-1]
        if base in rel_of:
            raise ValueError(f"CelebA source {path} holds {base!r} twice: {rel_of[base]!r} and {rel!r}")
        rel_of[base] = rel
    missing = [f for f in files if f not in rel_of]
    if missing:
        raise FileNotFoundError(f"CelebA source {path}: {len(missing)} image(s) listed in {CELEBA_ATTR_FILE} are "
                                f"not in {CELEBA_IMAGE_DIR}/, e.g. {missing[0]!r}")

    part = np.asarray([partition[f] for f in files], dtype=np.int64)
    rows = {s: np.flatnonzero(part == k) for k, s in enumerate(CELEBA_PARTITIONS)}
    rows["test"] = rows["test"][balance_cells(table[rows["test"], t], table[rows["test"], g], seed)]
    rows = {s: r for s, r in rows.items() if len(r)}
    targets = {rel_of[files[i]]: (s, j) for s, r in rows.items() for j, i in enumerate(r)}
    images = decode_into(path, targets, {s: len(r) for s, r in rows.items()}, size=size, crop=crop, workers=workers)

    classes = [f"not_{target}", target]
    options = {"target": target, "group": group, "size": size, "crop": crop, "seed": seed}
    rules = {"train": "official partition 0, every image, in file order",
             "valid": "official partition 1, every image, in file order",
             "test": ("official partition 2, every (group, target) cell cut to the smallest cell: "
                      + ("its first files in file order (the official code)" if seed is None
                         else f"a random choice per cell, np.random.default_rng({seed})"))}
    out: dict[str, DecodedData] = {}
    for s, r in rows.items():
        y, a = table[r, t].astype(np.int64), table[r, g].astype(np.int64)
        counts = {f"{group}={k}": np.bincount(y[a == k], minlength=2).tolist() for k in (0, 1)}
        out[s] = ProtocolData(
            images[s], y, classes, attrs={"group": a}, source=str(path),
            protocol={"protocol": "celeba", "version": VERSION, "reference": REFERENCE, "source": str(path),
                      "split": s, "options": options, "rule": rules[s], "classes": classes,
                      "groups": {"0": f"not_{group}", "1": group}, "counts": counts},
            lists={"files": [files[i] for i in r]} if s == "test" else {})
    return out
