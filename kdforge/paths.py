"""Where kdforge keeps decoded data and where it finds the shared public data: the defaults, in one place.

    KDFORGE_CACHE          cache home, default ~/.cache/kdforge; decoded datasets go to $KDFORGE_CACHE/data
    KDFORGE_SHARED_DATA    read-only public data, default <folder holding the repository>/shared/data

A variable that is set but empty counts as unset, so `KDFORGE_CACHE= kdforge ...` never writes to `/data`.
Recipes name these folders as `${KDFORGE_CACHE}` and `${KDFORGE_SHARED_DATA}` (see config.expand_path).
"""
from __future__ import annotations

import os
from pathlib import Path


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def cache_home() -> Path:
    """`$KDFORGE_CACHE`, else `~/.cache/kdforge`."""
    return _env_path("KDFORGE_CACHE") or Path.home() / ".cache" / "kdforge"


def default_cache_root() -> Path:
    """`$KDFORGE_CACHE/data`: the decoded-dataset root used by the CLI, recipes and the Python API."""
    return cache_home() / "data"


def default_shared_data() -> Path:
    """`$KDFORGE_SHARED_DATA`, else `<repo>/../shared/data` (it may not exist)."""
    return _env_path("KDFORGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
