"""A protocol split carries the record of how it was made, saved beside its cache as `protocol.json`.

A run that cites a protocol dataset cites its record: the protocol's name and version, every option with
its effective value (defaults included), the rules in words, per-cell counts, and the lists that make the
split reproducible without re-running it (which source images were greyed, which files are test). The
summary (everything but the lists) is also stored in the split's meta.json under "protocol".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.data.decoded import DecodedData, temp_name

PROTOCOL_FILE = "protocol.json"


@dataclass(repr=False, eq=False)
class ProtocolData(DecodedData):
    """A DecodedData with its protocol record: `protocol` (a small summary) and `lists` (long id lists)."""

    protocol: dict[str, Any] = field(default_factory=dict)
    lists: dict[str, list] = field(default_factory=dict)

    def save(self, directory: str | Path, *, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the cache (see DecodedData.save) and its `protocol.json`.

        prepare() saves every split into a generation that is committed only afterwards, so the cache and its
        record appear together; protocol.json itself is written to a temporary name and renamed.
        """
        target = super().save(directory, extra_meta={**(extra_meta or {}), "protocol": self.protocol})
        tmp = target / temp_name(PROTOCOL_FILE)
        tmp.write_text(json.dumps({**self.protocol, **self.lists}, indent=1))
        os.replace(tmp, target / PROTOCOL_FILE)
        return target


def load_protocol(name: str, split: str, root: str | Path | None = None) -> dict[str, Any]:
    """The protocol record of split `split` of the committed preparation of dataset `name`."""
    from kdforge.data.prepare import committed_preparation
    from kdforge.paths import default_cache_root

    base = Path(root).expanduser() if root is not None else default_cache_root()
    stamp = committed_preparation(name, base)
    if stamp is None or split not in stamp["splits"]:
        raise FileNotFoundError(f"no committed split {split!r} of dataset {name!r} under {base}")
    path = base / name / stamp["generation"] / split / PROTOCOL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset {name!r} split {split!r} was not made by a protocol ({path} is missing)")
    return json.loads(path.read_text())
