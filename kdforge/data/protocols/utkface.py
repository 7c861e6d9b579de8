"""UTKFace age classification with race as the sensitive group, as MFD (Jung et al., CVPR 2021) uses it.

target: age in bins; default edges (20, 40): 0-19, 20-39, 40+ -- the official code's `_transform_age`
    (age < 20, < 40, else), which made the paper's numbers. The paper's text says "0 to 19, 20 to 40, more
    than 40", which differs only at age 40 (in the third bin here); `age_bins=(20, 41)` gives that reading.
group: race, 0 White, 1 Black, 2 Asian, 3 Indian; race 4 (Others) is dropped, as in the paper.
split (data_handler/utkface.py): the official code natural-sorts the file names that split into four '_'
    fields with a race other than 4, shuffles them with Python's `random.seed(1); random.shuffle`, and takes
    the LAST `test_per_cell` (100) files of every (race, age bin) cell as the test set (4 x 3 x 100 = 1,200,
    balanced); the rest is train. Here the same list is shuffled with `random.Random(seed)` (default seed 1),
    so the split is the official one, except that the two malformed names the official code keeps
    ("...357jpg.chip.jpg", "...657 .jpg.chip.jpg") are dropped after the shuffle; were one of them among
    its cell's last 100, the next file of that cell would take its place.
malformed names (5 in the original release) are skipped with a warning that lists them.

Options: seed (1), test_per_cell (100), age_bins ((20, 40)), size (None: keep the source's size, 64 x 64 in
the shared copy and 200 x 200 in the original; e.g. 32 for CPU runs), workers. The record (options, rule,
per-cell counts, the file of every sample in order) is `protocol.json` beside each split.
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, natural_key
from kdforge.data.formats._decode_into import decode_into
from kdforge.data.formats.utkface import UTKFACE_RACES, parse_utkface_name, scan_utkface
from kdforge.data.protocols.record import ProtocolData
from kdforge.registry import DATASETS

VERSION = 1
GROUPS = UTKFACE_RACES[:4]  # Others dropped
REFERENCE = ("UTKFace (Zhang, Song and Qi, CVPR 2017); split of MFD (Jung et al., CVPR 2021) and its official "
             "code (data_handler/utkface.py)")


def age_bin_names(edges: Sequence[int]) -> list[str]:
    """Class names for bin edges: (20, 40) -> ['0-19', '20-39', '40+']."""
    lows = [0, *edges]
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"{lows[-1]}+"]


def age_class(age: int, edges: Sequence[int]) -> int:
    """The bin of an age: how many edges are <= it ((20, 40): 19 -> 0, 20 -> 1, 39 -> 1, 40 -> 2)."""
    return int(np.searchsorted(np.asarray(edges), age, side="right"))


def _check_edges(age_bins: Sequence[int]) -> tuple[int, ...]:
    edges = tuple(int(e) for e in age_bins)
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] <= 0:
        raise ValueError(f"utkface: age_bins must be increasing positive ages (bin edges), got {list(age_bins)}")
    return edges


def _official_candidate(name: str) -> bool:
    """The official code's filter: four '_'-separated fields and a race field other than '4'."""
    fields = name.split("_")
    return len(fields) == 4 and fields[2] != "4"


def utkface_split(
    names: Sequence[str], *, seed: int = 1, test_per_cell: int = 100, age_bins: Sequence[int] = (20, 40)
) -> dict[str, list[str]]:
    """The split of a list of UTKFace base names: `{"train", "test", "malformed"}` lists of names.

    Pure (file names in, file names out), so it can be checked on the real names without decoding a pixel.
    Train keeps the shuffled order, test the official one (each cell's files from the end of the shuffle).
    A (race, age bin) cell with fewer than `test_per_cell` files is an error, as the test set would not be
    balanced.
    """
    edges = _check_edges(age_bins)
    if int(test_per_cell) < 1:
        raise ValueError(f"utkface: test_per_cell must be >= 1, got {test_per_cell}")
    order = sorted((n for n in names if _official_candidate(n)), key=natural_key)
    random.Random(int(seed)).shuffle(order)
    malformed = sorted(n for n in names if parse_utkface_name(n) is None)
    bad = set(malformed)
    order = [n for n in order if n not in bad]  # after the shuffle: the official permutation of the rest

    def cell(name: str) -> tuple[int, int]:
        age, _, race = parse_utkface_name(name)
        return race, age_class(age, edges)

    taken: dict[tuple[int, int], int] = {}
    test = []
    for name in reversed(order):
        c = cell(name)
        if taken.get(c, 0) < test_per_cell:
            taken[c] = taken.get(c, 0) + 1
            test.append(name)
    short = {(r, b): taken.get((r, b), 0) for r in range(len(GROUPS)) for b in range(len(edges) + 1)
             if taken.get((r, b), 0) < test_per_cell}
    if short:
        labels = age_bin_names(edges)
        detail = ", ".join(f"{GROUPS[r]} {labels[b]}: {n}" for (r, b), n in sorted(short.items()))
        raise ValueError(f"utkface: cannot take test_per_cell={test_per_cell} images from every (race, age) cell; "
                         f"these cells have fewer ({detail})")
    in_test = set(test)
    return {"train": [n for n in order if n not in in_test], "test": test, "malformed": malformed}


@DATASETS.register("utkface")
def utkface(
    source: str | Path, *, seed: int = 1, test_per_cell: int = 100, age_bins: Sequence[int] = (20, 40),
    size: int | None = None, workers: int | None = None,
) -> dict[str, DecodedData]:
    """UTKFace "Aligned & Cropped" (dir, .tar, .tar.gz): age-bin target, race group, balanced test; see module."""
    path = check_source(source)
    edges = _check_edges(age_bins)
    files, malformed_rels = scan_utkface(path)
    if not files:
        raise ValueError(f"no UTKFace files (<age>_<gender>_<race>_<datetime>.jpg.chip.jpg) found in {path}")
    rel_of = {f.name: f.rel for f in files}
    all_names = [f.name for f in files] + [r.rsplit("/", 1)[-1] for r in malformed_rels]
    split = utkface_split(all_names, seed=seed, test_per_cell=test_per_cell, age_bins=edges)
    if malformed_rels:
        warnings.warn(f"UTKFace source {path}: skipped {len(malformed_rels)} malformed file name(s) (not "
                      f"<age>_<gender>_<race>_<datetime>.jpg.chip.jpg): {', '.join(sorted(malformed_rels))}",
                      stacklevel=2)
    targets = {rel_of[n]: (s, i) for s in ("train", "test") for i, n in enumerate(split[s])}
    images = decode_into(path, targets, {s: len(split[s]) for s in ("train", "test")}, size=size, workers=workers)

    classes = age_bin_names(edges)
    options = {"seed": int(seed), "test_per_cell": int(test_per_cell), "age_bins": list(edges), "size": size}
    rule = (f"names with 4 '_' fields and race != 4, natural-sorted, shuffled by random.Random({int(seed)}); "
            f"test = the last {int(test_per_cell)} of every (race, age bin) cell, train = the rest; "
            "malformed names dropped after the shuffle")
    out: dict[str, DecodedData] = {}
    for s in ("train", "test"):
        labels = [parse_utkface_name(n) for n in split[s]]
        race = np.asarray([r for _, _, r in labels], dtype=np.int64)
        target = np.asarray([age_class(a, edges) for a, _, _ in labels], dtype=np.int64)
        counts = {g: np.bincount(target[race == k], minlength=len(classes)).tolist() for k, g in enumerate(GROUPS)}
        out[s] = ProtocolData(
            images[s], target, classes, attrs={"group": race}, source=str(path),
            protocol={"protocol": "utkface", "version": VERSION, "reference": REFERENCE, "source": str(path),
                      "split": s, "options": options, "rule": rule, "classes": classes,
                      "groups": {str(i): g for i, g in enumerate(GROUPS)}, "counts": counts,
                      "skipped_malformed": split["malformed"], "files": "list 'files': the file of every sample"},
            lists={"files": split[s]})
    return out
