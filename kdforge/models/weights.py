"""Load weights into a model from any of the usual checkpoint layouts, with errors that name the keys.

Accepted: a plain state dict; a kdforge checkpoint (``{"model": state_dict, ...}``); a dict holding the
state dict under ``"state_dict"`` or ``"student"`` (e.g. the pretrained CIFAR ResNets,
``{"state_dict": ..., "best_prec1": ...}``); any of these with keys prefixed ``module.`` (DataParallel /
DDP) or ``_orig_mod.`` (``torch.compile``), which are stripped. Files are always read with
``torch.load(map_location="cpu", weights_only=True)``: a checkpoint can never run code on load. A file
that is empty, truncated, corrupt or needs more than tensors to unpickle fails with one error naming it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.engine.checkpoint import read_torch_file

log = logging.getLogger(__name__)

_CANDIDATE_KEYS = ("model", "state_dict", "student")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any, key: str | None, source: str) -> Mapping[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: ``obj`` itself or the first of key/model/state_dict/student."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"key {key!r} not found in checkpoint {source} (top-level keys: {keys})")
        obj = obj[key]
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for k in _CANDIDATE_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                try:
                    return _find_state_dict(obj[k], None, source)
                except ValueError:
                    continue
        keys = ", ".join(map(str, obj))
        raise ValueError(
            f"no state dict found in checkpoint {source}: expected tensors at the top level or under one of"
            f" {', '.join(_CANDIDATE_KEYS)} (top-level keys: {keys}); pass key=... to choose one"
        )
    raise ValueError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` when every key has it, keeping the modules' version metadata."""
    out = dict(sd)
    meta = dict(getattr(sd, "_metadata", None) or {})
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = {k.removeprefix(p): v for k, v in out.items()}
                meta = {k.removeprefix(p): v for k, v in meta.items()}
                changed = True
    result = OrderedDict(out)
    if meta:
        # load_state_dict reads per-module versions here (e.g. BatchNorm's num_batches_tracked migration).
        result._metadata = meta  # type: ignore[attr-defined]
    return result


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_weights(
    model: nn.Module,
    path_or_state: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    key: str | None = None,
) -> nn.Module:
    """Load a checkpoint file or a (wrapped) state dict into ``model`` in place, and return ``model``.

    ``key`` picks the entry holding the state dict; by default the object itself when it is a dict of
    tensors, else the first of ``"model"``, ``"state_dict"``, ``"student"`` that holds one. With
    ``strict=True`` every model key must be present and no extra key may remain (BatchNorm's
    ``num_batches_tracked`` counters are exempt: old checkpoints lack them). Shape mismatches always fail.

    Raises:
        FileNotFoundError: the path does not exist (the message names it).
        CheckpointReadError (a ValueError and a RuntimeError): the file is empty, truncated, corrupt, or
            holds pickled objects other than tensors (never executed), named with the path.
        ValueError: no state dict in the checkpoint, or ``key`` is absent.
        RuntimeError: missing / unexpected keys (strict) or shape mismatches, listed by name (up to 10 each).
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: '{path}'")
        source = f"'{path}'"
        loaded = read_torch_file(path, "weights file")
    else:
        source, loaded = "(in-memory state dict)", path_or_state
    sd = _strip_wrappers(_find_state_dict(loaded, key, source))

    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if problems:
        raise ValueError(f"cannot load {source} into {type(model).__name__}: " + "; ".join(problems))
    if missing or unexpected:
        log.warning(
            "loading %s into %s non-strictly: %d missing (%s), %d unexpected (%s)",
            source,
            type(model).__name__,
            len(missing),
            _listed(missing),
            len(unexpected),
            _listed(unexpected),
        )
    # Counters absent from the checkpoint keep the model's values; everything else was checked above.
    model.load_state_dict(sd, strict=False)
    return model
