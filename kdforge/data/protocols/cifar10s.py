"""CIFAR-10S (CIFAR-10 Skewed; Wang et al., CVPR 2020), as MFD (Jung et al., CVPR 2021, Sec. 4.1) builds it.

Every CIFAR-10 image is kept; some are turned grey. Group attribute `group`: 0 grey, 1 colour (as the
official MFD code, data_handler/cifar10.py).

train, skew s (default 0.8): in each of the classes 0-4, floor(s * n_c) images are grey and the rest colour;
    in classes 5-9 the reverse (n_c - floor(s * n_c) grey). With CIFAR-10's 5,000 images a class and s = 0.8:
    classes 0-4 have 4,000 grey + 1,000 colour, classes 5-9 1,000 grey + 4,000 colour, so each group holds
    25,000 images. Which images are grey: the first ones of each class in the order of
    `np.random.RandomState(seed).permutation(n_train)` -- the very draw of the official code (it shuffles
    with np.random.seed(seed) and greys the first images of a class it meets), so from the official pickles
    the same seed greys the same images. s = 0.5 gives 2,500 + 2,500 in every class.
train, unskewed=True: the paper's "Unskewed" training set ("Composite CIFAR-10", Sec. 4.1): every train image
    in grey AND in colour (100,000), so group and class are independent and each image appears as a pair.
test: every test image in grey, then every test image in colour (20,000), as the paper and the code do.

Grey: ITU-R BT.601 luma in Pillow's fixed point, Y = (19595 R + 38470 G + 7471 B + 32768) >> 16, i.e.
round(0.299 R + 0.587 G + 0.114 B), exactly what the official code's PIL `convert('L')` computes, copied to
all three channels. Attribute `source_index`: the row of the source split a sample was made from (a grey and
a colour copy share it), so the grey/colour pair of any image can be found (the paper's Mean/Gray/Color
teachers). The record (options, rule, counts, the greyed source indices) is `protocol.json` beside the split.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdforge.data.decoded import DecodedData
from kdforge.data.formats import detect_cifar_pickle
from kdforge.data.prepare import cifar10
from kdforge.data.protocols.record import ProtocolData
from kdforge.registry import DATASETS

VERSION = 1
GROUPS = ("grey", "colour")
GREY_FORMULA = ("ITU-R BT.601 luma in Pillow's fixed point: Y = (19595 R + 38470 G + 7471 B + 32768) >> 16 "
                "= round(0.299 R + 0.587 G + 0.114 B) (PIL convert('L'), as the official code), copied to 3 channels")
REFERENCE = ("CIFAR-10S: Wang et al., CVPR 2020; as built by MFD (Jung et al., CVPR 2021, Sec. 4.1) and its "
             "official code (data_handler/cifar10.py)")


def to_grey(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W, 3) uint8 with R = G = B = the BT.601 luma (Pillow's convert('L'))."""
    out = np.empty_like(images)
    weights = np.array([19595, 38470, 7471], dtype=np.uint32)
    for start in range(0, len(images), chunk):  # chunked: uint32 intermediates of all 50,000 images are 600 MB
        x = np.asarray(images[start:start + chunk], dtype=np.uint32)
        y = ((x @ weights + 32768) >> 16).astype(np.uint8)
        out[start:start + chunk] = y[..., None]
    return out


def grey_counts(n_per_class: np.ndarray, skew: float) -> np.ndarray:
    """Grey images per class: floor(skew * n_c) in the first half of the classes, n_c minus that in the rest."""
    n = np.asarray(n_per_class, dtype=np.int64)
    # + 1e-9: 0.7 * 50 is 34.999999999999996 in floating point; the official code meant 35
    skewed = np.array([math.floor(skew * int(c) + 1e-9) for c in n], dtype=np.int64)
    first = np.arange(len(n)) < len(n) // 2
    return np.where(first, skewed, n - skewed)


def grey_mask(labels: np.ndarray, num_classes: int, skew: float, seed: int) -> np.ndarray:
    """Which samples are grey: per class, the first `grey_counts` ones in a seeded permutation's order."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.random.RandomState(seed).permutation(len(labels))  # the official code's np.random.shuffle draw
    want = grey_counts(np.bincount(labels, minlength=num_classes), skew)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        members = order[labels[order] == c]
        mask[members[:want[c]]] = True
    return mask


def _counts(labels: np.ndarray, group: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    return {g: np.bincount(labels[group == k], minlength=num_classes).tolist() for k, g in enumerate(GROUPS)}


def _both(data: DecodedData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every image in grey, then every image in colour: images, labels, group, source_index."""
    n = len(data)
    images = np.concatenate([to_grey(data.images), np.asarray(data.images)])
    return images, np.tile(data.labels, 2), np.repeat([0, 1], n), np.tile(np.arange(n), 2)


@DATASETS.register("cifar10s")
def cifar10s(
    source: str | Path, *, skew: float | None = None, seed: int = 0, unskewed: bool = False,
    workers: int | None = None,
) -> dict[str, DecodedData]:
    """CIFAR-10S from CIFAR-10 (the official pickles or a JPEG/PNG class-folder tree): train and test.

    `skew` (default 0.8) is the share of grey images in classes 0-4 (of colour ones in classes 5-9); `seed`
    picks which images are grey; `unskewed=True` builds the paper's Unskewed (composite) training set instead,
    every train image in both grey and colour, and then takes no `skew`. See the module docstring.
    """
    if unskewed and skew is not None:
        raise ValueError("cifar10s: unskewed=True puts every train image in grey and in colour; it takes no skew")
    skew = 0.8 if skew is None else float(skew)
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"cifar10s: skew must lie in [0, 1], got {skew}")
    seed = int(seed)
    kind = "official CIFAR-10 python pickles" if detect_cifar_pickle(source) == "cifar10" else "class-folder tree"
    base = cifar10(source, **({"workers": workers} if workers else {}))
    missing = [s for s in ("train", "test") if s not in base]
    if missing:
        raise ValueError(f"cifar10s needs CIFAR-10's train and test splits; {source} has no {' or '.join(missing)}")
    train, test = base["train"], base["test"]
    k = train.num_classes
    order = ("data_batch_1..5 in file order" if kind.startswith("official")
             else "class folder, then file name in natural order")
    common = {"protocol": "cifar10s", "version": VERSION, "reference": REFERENCE, "source": str(source),
              "source_format": kind, "source_order": order,
              "options": {"skew": None if unskewed else skew, "seed": seed, "unskewed": bool(unskewed)},
              "groups": {str(i): g for i, g in enumerate(GROUPS)}, "grey": GREY_FORMULA,
              "source_index": "attribute source_index: the row of the source split a sample was made from"}

    lists: dict[str, list] = {}
    if unskewed:
        images, labels, group, src = _both(train)
        rule = "Unskewed (composite CIFAR-10): every train image in grey (first half), then in colour"
    else:
        grey = grey_mask(train.labels, k, skew, seed)
        images = np.array(train.images)
        images[grey] = to_grey(images[grey])
        labels, group, src = train.labels, (~grey).astype(np.int64), np.arange(len(train))
        rule = (f"classes 0-{k // 2 - 1}: floor({skew} * n_c) grey, the rest colour; classes {k // 2}-{k - 1}: "
                f"the reverse; grey = the first of each class in np.random.RandomState({seed}).permutation("
                f"{len(train)}) order (the official code's draw)")
        lists["greyed_source_indices"] = np.flatnonzero(grey).tolist()
    out: dict[str, DecodedData] = {
        "train": ProtocolData(images, labels, train.classes, attrs={"group": group, "source_index": src},
                              source=str(source),
                              protocol={**common, "split": "train", "rule": rule,
                                        "counts": _counts(labels, group, k)},
                              lists=lists)}
    images, labels, group, src = _both(test)
    out["test"] = ProtocolData(images, labels, test.classes, attrs={"group": group, "source_index": src},
                               source=str(source),
                               protocol={**common, "split": "test", "counts": _counts(labels, group, k),
                                         "rule": "every test image in grey (first half), then in colour"})
    return out
