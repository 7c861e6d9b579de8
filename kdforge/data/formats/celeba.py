"""CelebA (Liu et al., ICCV 2015) in its official layout (a directory, .tar or .tar.gz; files at any depth):

    img_align_celeba/000001.jpg ... 202599.jpg    aligned and cropped faces, 178x218 (W x H)
    list_attr_celeba.txt       line 1: the number of images; line 2: the 40 attribute names;
                               then one line per image: `000001.jpg -1  1  1 -1 ...` (40 values, -1 or 1)
    list_eval_partition.txt    `000001.jpg 0` per image: 0 train, 1 valid, 2 test

Fields are separated by any run of spaces (the official file aligns its columns with double spaces).
"""
from __future__ import annotations

import numpy as np

CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_PARTITIONS = ("train", "valid", "test")  # the values 0, 1, 2 of the partition file


def parse_celeba_attrs(text: str, where: str = CELEBA_ATTR_FILE) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, image file names, (N, n_attrs) int8 values in {0, 1}) of list_attr_celeba.txt.

    -1/1 are mapped to 0/1, as the official code does. The count line must agree with the rows, and every
    row must hold one value per attribute, each -1 or 1; an error names the line.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{where}: expected a count line and a header line of attribute names")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{where}: line 1 should be the number of images, got {lines[0].strip()[:40]!r}") from None
    names = lines[1].split()
    if not names:
        raise ValueError(f"{where}: line 2 should list the attribute names")
    files, rows = [], []
    for k, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if len(fields) != len(names) + 1:
            raise ValueError(f"{where} line {k}: {len(fields) - 1} values for {len(names)} attributes")
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{where} line {k}: values must be -1 or 1") from None
        if any(v not in (-1, 1) for v in values):
            raise ValueError(f"{where} line {k}: values must be -1 or 1")
        files.append(fields[0])
        rows.append(values)
    if count != len(files):
        raise ValueError(f"{where}: line 1 says {count} images but {len(files)} rows follow")
    table = (np.asarray(rows, dtype=np.int8).reshape(len(files), len(names)) + 1) // 2
    return names, files, table


def parse_celeba_partition(text: str, where: str = CELEBA_PARTITION_FILE) -> dict[str, int]:
    """`{image file name: 0 | 1 | 2}` of list_eval_partition.txt (0 train, 1 valid, 2 test)."""
    out: dict[str, int] = {}
    for k, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{where} line {k}: expected `<file> 0|1|2`, got {line.strip()[:60]!r}")
        if fields[0] in out:
            raise ValueError(f"{where} line {k}: {fields[0]!r} is listed twice")
        out[fields[0]] = int(fields[1])
    return out
