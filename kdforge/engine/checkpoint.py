"""Atomic checkpoints and the RNG state that makes a resumed run continue bit for bit.

Writes go to a temp file in the same folder, are fsynced, then renamed over the target, so a crash never
leaves a half-written checkpoint. `save_checkpoint` refuses to write NaN/Inf weights and keeps the
checkpoint it replaces as `previous.pt`; `load_checkpoint_with_fallback` falls back to it when `last.pt`
is unreadable. Files are read with `weights_only=True` only: a checkpoint can never run code on load.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class NonFiniteStateError(FloatingPointError):
    """A parameter, buffer or state tensor holds NaN or Inf; the message names the first such tensor."""


class CheckpointReadError(RuntimeError, ValueError):
    """A checkpoint or weights file cannot be read (empty, truncated, corrupt, or not tensors only)."""


class DiskFullError(OSError, RuntimeError):
    """A checkpoint could not be written because the disk (or quota) is full; the older file is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


# ------------------------------------------------------------------------------------------ finiteness
def _named_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(kind, dotted name, tensor) for every tensor in a module or a nested dict/list/tuple state."""
    if isinstance(state, nn.Module):
        for name, p in state.named_parameters():
            yield "parameter", name, p
        for name, b in state.named_buffers():
            yield "buffer", name, b
    elif isinstance(state, torch.Tensor):
        yield "tensor", prefix or "<tensor>", state
    elif isinstance(state, Mapping):
        for k, v in state.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def assert_finite_state(state: nn.Module | Mapping[str, Any] | Any, what: str) -> None:
    """Raise NonFiniteStateError when any floating tensor in `state` holds NaN or Inf.

    `state` is a module (its parameters and buffers are named as such), a state dict, or any nested
    dict/list/tuple of tensors (a whole checkpoint, optimiser moments included). `what` says whose state
    it is, for the message: "parameter 'layer1.0.conv.weight' of the student has 12 NaN values".

    >>> assert_finite_state({"w": torch.ones(2)}, "the student")  # finite: returns None
    """
    floats = [(kind, name, t) for kind, name, t in _named_tensors(state)
              if (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided and t.device.type != "meta"]
    if not floats:
        return
    # one host sync per device on the happy path; the culprit is searched only on failure
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, t in floats:
        by_device.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return
    for kind, name, t in floats:
        t = t.detach()
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:
            counts = " and ".join(f"{n} {label} value{'s' if n != 1 else ''}"
                                  for n, label in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
            raise NonFiniteStateError(f"{kind} {name!r} of {what} has {counts}")


# ------------------------------------------------------------------------------------------ writing
def _file_mode() -> int:
    """The mode a plain open() would give a new file (0666 less the umask); mkstemp alone gives 0600."""
    try:
        with open("/proc/self/status") as f:  # Linux: reads the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only for an instant)
    os.umask(mask)
    return 0o666 & ~mask


def previous_path(path: str | Path) -> Path:
    """Where `save_checkpoint` keeps the file it replaces: last.pt -> previous.pt, x.pt -> x.previous.pt."""
    path = Path(path)
    return path.with_name("previous.pt" if path.name == "last.pt" else f"{path.stem}.previous{path.suffix}")


def _keep_as_previous(path: Path) -> None:
    """Make the current `path` also `previous.pt`; a hard link keeps `path` itself in place meanwhile."""
    prev = previous_path(path)
    link = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if link.exists():
            link.unlink()
        os.link(path, link)
        os.replace(link, prev)
    except OSError:  # no hard links on this filesystem: move it (a crash now leaves only previous.pt)
        if link.exists():
            link.unlink()
        os.replace(path, prev)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the renames themselves survive a power cut
    except OSError:
        pass
    finally:
        os.close(fd)


_WRITER_FAILED = ("file write failed", "PytorchStreamWriter failed")


def _disk_full_error(e: BaseException, path: Path) -> DiskFullError | None:
    """A DiskFullError for ENOSPC / EDQUOT, or for torch's writer failing (it hides the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        detail = os.strerror(e.errno).lower()
    elif isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITER_FAILED):
        detail = "torch's writer failed"
    else:
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on {path.parent} while writing {path.name} ({detail}; {free}); "
                         f"the previous checkpoint is kept: free some space, then resume")


def atomic_save(obj: Any, path: str | Path, *, keep_previous: bool = False) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old file whole.

    With `keep_previous`, the file being replaced stays as `previous_path(path)`. The new file gets the
    mode of the run's other files (0666 less the umask). A full disk raises DiskFullError naming the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            _keep_as_previous(path)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = _disk_full_error(e, path)
        if full is not None:
            raise full from e
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: Mapping[str, Any], path: str | Path, *, keep_previous: bool = True,
                    check_finite: bool = True) -> None:
    """Write a checkpoint atomically, refusing NaN/Inf tensors and keeping the one it replaces.

    Raises NonFiniteStateError (nothing written, the last good checkpoint stays) or DiskFullError.
    """
    path = Path(path)
    if check_finite:
        try:
            assert_finite_state(state, "the checkpoint")
        except NonFiniteStateError as e:
            raise NonFiniteStateError(f"{e}; {path} was not written, the last good checkpoint is kept") from None
    atomic_save(state, path, keep_previous=keep_previous)


# ------------------------------------------------------------------------------------------ reading
def _explain_load_error(e: BaseException) -> str:
    """What went wrong, in words, without torch's advice to load with weights_only=False."""
    text = str(e)
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return (f"it holds a pickled Python object ({found.group(1)}), not only tensors; kdforge never runs code "
                f"from a file: re-save just the tensors, e.g. torch.save(model.state_dict(), path)")
    if "Weights only load failed" in text or e.__class__.__name__ == "UnpicklingError":
        return "it is not a torch checkpoint, or it is corrupt (unreadable pickle data)"
    if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return "the file is truncated or corrupt (incomplete zip archive)"
    if isinstance(e, EOFError) or "unexpected EOF" in text:
        return "the file is truncated (it ends early)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "weights_only" in first:
        first = ""
    return f"it is not a torch checkpoint, or it is corrupt ({type(e).__name__}{': ' + first if first else ''})"


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True) on the CPU, with one clear error naming the path.

    Raises FileNotFoundError, or CheckpointReadError for an empty, truncated or corrupt file and for a
    pickle that needs more than tensors and plain containers (its payload is never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.stat().st_size == 0:
            raise CheckpointReadError(f"cannot read {what} {path}: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            # files pickled with protocol 4+ load fine; torch's note about it is noise to a user
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointReadError:
        raise
    except OSError as e:
        raise CheckpointReadError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises many types for a bad file (KeyError for garbage, EOFError, ...)
        # `from None`: the chained torch error would repeat its weights_only=False advice
        raise CheckpointReadError(f"cannot read {what} {path}: {_explain_load_error(e)}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A kdforge checkpoint (or any dict saved with torch.save) as a dict, on the CPU."""
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(f"cannot read checkpoint {path}: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_checkpoint_with_fallback(path: str | Path) -> dict[str, Any]:
    """`load_checkpoint(path)`, or the previous checkpoint (with a warning naming both) when `path` is
    missing or unreadable and `previous_path(path)` can be read. Raises the error for `path` otherwise."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path)
    except (CheckpointReadError, FileNotFoundError) as e:
        if not prev.is_file():
            raise
        try:
            ckpt = load_checkpoint(prev)
        except CheckpointReadError as e2:
            raise CheckpointReadError(f"{e}; the previous checkpoint is unreadable too: {e2}") from None
        reason = "is missing" if isinstance(e, FileNotFoundError) else "is unreadable"
        warnings.warn(f"checkpoint {path} {reason} ({e}); using the previous checkpoint {prev} instead, "
                      f"so the run continues from one checkpoint earlier", stacklevel=2)
        return ckpt


# ------------------------------------------------------------------------------------------ RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _np_state_to_tensors(state: tuple) -> dict[str, Any]:
    # numpy's legacy state tuple holds an ndarray; store it as a tensor so weights_only loading works
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _np_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
