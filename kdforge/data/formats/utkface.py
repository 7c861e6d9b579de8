"""UTKFace (Zhang, Song and Qi, CVPR 2017), "Aligned & Cropped Faces": labels live in the file names.

    UTKFace/<age>_<gender>_<race>_<date&time>.jpg.chip.jpg

age 0-116 (years), gender 0 male / 1 female, race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others, date&time
the 17 digits yyyymmddHHMMSSFFF. The original release holds five names that do not have this form (a field
missing, a missing dot, a space before the extension); `scan_utkface` reports them instead of guessing.
Given as a directory, a .tar or a .tar.gz; files are found by name at any depth.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kdforge.data.formats._archive import check_source, is_image
from kdforge.data.formats._decode_into import scan

UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
UTKFACE_GENDERS = ("male", "female")
_NAME = re.compile(r"^(?P<age>\d{1,3})_(?P<gender>[01])_(?P<race>[0-4])_\d+\.jpg\.chip\.jpg$")


@dataclass(frozen=True)
class UTKFaceFile:
    """One well-formed file: its path inside the source, base name and the three labels of its name."""

    rel: str
    name: str
    age: int
    gender: int
    race: int


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """(age, gender, race) of an official file name (a base name), or None when it does not have the form."""
    m = _NAME.match(name)
    return None if m is None else (int(m["age"]), int(m["gender"]), int(m["race"]))


def scan_utkface(source: str | Path) -> tuple[list[UTKFaceFile], list[str]]:
    """The well-formed files of a UTKFace source and the relative paths of the malformed ones (no decoding).

    Only .jpg/.jpeg/.png files are looked at; a base name found twice is an error naming both paths.
    """
    path = check_source(source)
    rels, _ = scan(path, is_image)
    files, malformed, where = [], [], {}
    for rel in rels:
        name = rel.rsplit("/", 1)[-1]
        if name in where:
            raise ValueError(f"UTKFace source {path} holds {name!r} twice: {where[name]!r} and {rel!r}")
        where[name] = rel
        labels = parse_utkface_name(name)
        if labels is None:
            malformed.append(rel)
        else:
            files.append(UTKFaceFile(rel, name, *labels))
    return files, malformed
