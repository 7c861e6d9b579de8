"""Run folders that kdforge can own safely: created and marked by kdforge, locked while a run writes them,
replaced (`--overwrite`) only when they hold nothing but kdforge's own files, and resumed only with the
config they were started with.

    with open_run_folder("runs", "kd_resnet20", resume=False, overwrite=False, config=cfg.to_dict()) as run:
        ...  # write into run.path; run.last_checkpoint is checkpoints/last.pt

A folder kdforge creates carries a `.kdforge-run` marker. `--overwrite` empties such a folder (the folder
itself, its marker and its lock stay), and refuses anything else: a folder without the marker, one holding
files kdforge does not write, `.`, the working directory or one of its parents, the home directory, `/`.
While a run is open the folder is locked with `fcntl.flock` on `.lock` (pid, host and start time written
in it); the kernel releases the lock when the process dies, so a killed run never leaves it stuck.
"""
from __future__ import annotations

import datetime
import errno
import fnmatch
import json
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import yaml

from kdforge.config import ConfigError, validate_run_name

try:
    import fcntl
except ImportError:  # Windows: runs work, but two runs into one folder are not stopped
    fcntl = None  # type: ignore[assignment]

MARKER = ".kdforge-run"
LOCK = ".lock"

# What kdforge writes at the top of a run folder, and inside its two subfolders (name patterns); a file a
# run writes must be listed here, or --overwrite will refuse to replace the folder.
SWEEP_LOG = "sweep.log"  # `kdforge sweep` writes each run's output here, open while the run (re)starts: kept
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "summary.json", "teacher_metrics.json", "*.png",
             ".*.tmp", MARKER, LOCK, SWEEP_LOG)
RUN_DIRS = {"checkpoints": ("*.pt", ".*.tmp"), "tb": ("events.out.tfevents.*",), "samples": ("*.png",)}

# Settings a resumed run may change: they say how long to train and how to report, not what is trained.
# train.epochs extends a finished run; train.max_steps is where a smoke run stopped; train.device moves a
# run between machines (numerics may differ in the last bits); out_dir may be spelled differently.
SAFE_RESUME_KEYS: frozenset[str] = frozenset({
    "out_dir", "train.epochs", "train.max_steps", "train.progress", "train.log_every", "train.tensorboard",
    "train.checkpoint_every", "train.eval_every", "train.device",
})


class RunFolderError(ValueError):
    """The run folder path cannot be used: not a directory, not writable, or unsafe to replace."""


class RunFolderExistsError(FileExistsError):
    """The folder already holds a run, or is not a kdforge run folder and is not empty."""


class RunFolderLockedError(FileExistsError):
    """Another live process has the run folder open; the message names it (pid, host, start time)."""


class ResumeConfigError(ConfigError):
    """A resumed run's config differs from the saved one in settings that change what is trained."""


class RunFolder:
    """An open, locked run folder; `close()` (or leaving the `with` block) releases the lock."""

    def __init__(self, path: Path, *, resumed: bool, lock_fd: int | None) -> None:
        self.path = path
        self.resumed = resumed
        self._lock_fd = lock_fd

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def check_resume_config(self, config: dict[str, Any],
                            safe_keys: Collection[str] = SAFE_RESUME_KEYS) -> None:
        """Compare `config` with the folder's config.yaml; see `check_resume_config`."""
        check_resume_config(self.path, config, safe_keys)

    def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # still held: nobody reads a stale holder from it later
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, resumed={self.resumed}, locked={self._lock_fd is not None})"


# ------------------------------------------------------------------------------------------ opening
def open_run_folder(out_dir: str | os.PathLike[str], name: str, *, resume: bool, overwrite: bool,
                    config: dict[str, Any] | None = None,
                    safe_resume_keys: Collection[str] = SAFE_RESUME_KEYS) -> RunFolder:
    """Create, replace or reopen `<out_dir>/<name>` for a run, and lock it until `close()`.

    `out_dir` must already be expanded (`~`, `$VARS`). A fresh start (neither flag) needs a new or empty
    folder, or a kdforge run folder without a checkpoint (a failed attempt, whose stale files are removed).
    `overwrite` empties a kdforge run folder holding only kdforge's files. `resume` needs
    checkpoints/last.pt (or previous.pt), and with `config` compares it with the saved config.yaml
    (`config` must be the resolved config as it will be saved, e.g. with num_classes filled in; else pass
    None and call `RunFolder.check_resume_config` once it is). Temp files of killed writes are removed.

    Raises ConfigError (bad name, both flags, resume config mismatch), FileNotFoundError (nothing to
    resume), RunFolderExistsError (a run is there, or a foreign folder), RunFolderLockedError (in use),
    RunFolderError (not a directory, not writable, unsafe to overwrite).
    """
    validate_run_name(name)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them, not both")
    path = Path(out_dir) / name
    try:
        return _open(path, resume, overwrite, config, safe_resume_keys)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, FileExistsError)):  # ours, or a folder removed meanwhile
            raise
        hint = " (read-only?)" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise RunFolderError(f"cannot use run folder {path}: {e.strerror or e}{hint}") from e


def _open(path: Path, resume: bool, overwrite: bool, config: dict[str, Any] | None,
          safe_resume_keys: Collection[str]) -> RunFolder:
    for p, what in ((path.parent, "output folder (out_dir)"), (path, "run folder")):
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{what} {p} exists and is not a directory")
    if resume:
        if not _holds_run(path):
            raise FileNotFoundError(f"nothing to resume: {path / 'checkpoints' / 'last.pt'} does not exist")
    elif path.is_dir():
        _check_fresh_start(path, overwrite)  # before anything is written into a folder that may not be ours

    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path, resumed=resume, lock_fd=_lock(path))
    try:
        if resume:
            if config is not None:
                check_resume_config(path, config, safe_resume_keys)
            if not unexpected_entries(path):  # a run of a kdforge from before the markers: adopt it
                _write_marker(path)
        else:
            _check_fresh_start(path, overwrite)  # again, now that no other kdforge run can change it
            # a failed attempt's or the replaced run's files go; a sweep's log of its attempts stays
            _remove(path, _own_entries(path, keep=(MARKER, LOCK, SWEEP_LOG)))
            _write_marker(path)
        _remove(path, _killed_writes(path))
    except BaseException:
        folder.close()
        raise
    return folder


def _holds_run(path: Path) -> bool:
    return any((path / "checkpoints" / f).is_file() for f in ("last.pt", "previous.pt"))


def _entries(path: Path) -> list[str]:
    return sorted(e for e in os.listdir(path) if e not in (LOCK, MARKER))


def _is_own_file(name: str, patterns: Iterable[str] = RUN_FILES) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def unexpected_entries(path: str | Path) -> list[str]:
    """Entries of a run folder that kdforge does not write (symlinks count as unexpected), relative paths."""
    path = Path(path)
    odd = []
    for entry in sorted(os.listdir(path)):
        p = path / entry
        if p.is_symlink():
            odd.append(entry)
        elif p.is_dir() and entry in RUN_DIRS:
            odd += [f"{entry}/{e}" for e in sorted(os.listdir(p))
                    if (p / e).is_symlink() or not (p / e).is_file() or not _is_own_file(e, RUN_DIRS[entry])]
        elif not (p.is_file() and _is_own_file(entry)):
            odd.append(entry + ("/" if p.is_dir() else ""))
    return odd


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_fresh_start(path: Path, overwrite: bool) -> None:
    """Raise unless a fresh run (or, with `overwrite`, a replacement) may be written into `path`."""
    entries = _entries(path)
    if not entries:
        return
    marked = (path / MARKER).is_file()
    odd = unexpected_entries(path)
    if not marked:
        if _holds_run(path) and not odd:
            raise RunFolderExistsError(
                f"run folder {path} already holds a run (from a kdforge without run markers); pass --resume to "
                f"continue it or --set name=<new name>; --overwrite replaces only folders marked {MARKER}, so "
                f"delete this one yourself to start over")
        raise RunFolderExistsError(
            f"{path} exists, is not empty and is not a kdforge run folder (no {MARKER} marker; it holds "
            f"{_listed(entries)}); kdforge writes runs only into new or empty folders: choose another "
            f"--set name=... or --set out_dir=...")
    if _holds_run(path) and not overwrite:
        raise RunFolderExistsError(f"run folder {path} already holds a run; pass --resume to continue it, "
                                   f"--overwrite to replace it, or --set name=<new name>")
    if overwrite:
        _refuse_dangerous(path)
        if odd:
            raise RunFolderExistsError(
                f"--overwrite refused: run folder {path} holds files kdforge did not write ({_listed(odd)}); "
                f"move them away or choose another --set name=...")


def _refuse_dangerous(path: Path) -> None:
    """Never empty `/`, the home directory, the working directory or a folder above it."""
    target = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor) or target == home or target in home.parents:
        raise RunFolderError(f"--overwrite refused: {path} is {target}, the root or the home directory")
    if target == cwd or target in cwd.parents:
        raise RunFolderError(f"--overwrite refused: {path} is {target}, the working directory or a folder above it")


def _own_entries(path: Path, keep: Collection[str]) -> list[Path]:
    """Top-level files and folders kdforge writes (folders only when they hold nothing else), less `keep`."""
    odd = {e.split("/")[0] for e in unexpected_entries(path)}
    return [path / e for e in sorted(os.listdir(path)) if e not in keep and e not in odd]


def _killed_writes(path: Path) -> list[Path]:
    """Temp files left by writes that a kill interrupted (atomic_save's `.last.pt.XXXX.tmp`)."""
    found = [path / e for e in os.listdir(path) if fnmatch.fnmatchcase(e, ".*.tmp")]
    ckpts = path / "checkpoints"
    if ckpts.is_dir() and not ckpts.is_symlink():
        found += [ckpts / e for e in os.listdir(ckpts) if fnmatch.fnmatchcase(e, ".*.tmp")]
    return [p for p in found if p.is_file() and not p.is_symlink()]


def _remove(root: Path, paths: Iterable[Path]) -> None:
    for p in paths:
        if p.parent != root and p.parent.parent != root:  # only what the listings above found
            raise RuntimeError(f"internal error: refusing to delete {p} outside {root}")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _write_marker(path: Path) -> None:
    marker = path / MARKER
    if not marker.is_file():
        marker.write_text("This folder is a kdforge run folder: `kdforge ... --overwrite` may empty it.\n"
                          f"created: {_now()}\n")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ locking
def _lock(path: Path) -> int | None:
    """flock `<path>/.lock` without waiting and write who holds it; the fd is the lock (None: no locking)."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    if fcntl is None:
        warnings.warn(f"cannot lock {path} on this platform: two runs into it would not be stopped", stacklevel=3)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunFolderLockedError(f"run folder {path} is in use by another kdforge run ({holder}); wait for it "
                                   f"to finish, or choose another --set name=...") from None
    except OSError as e:  # e.g. a network filesystem without flock: run, but say it is unprotected
        warnings.warn(f"cannot lock {path} ({e.strerror}): two runs into it would not be stopped", stacklevel=3)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


# ------------------------------------------------------------------------------------------ resume config
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b  # 4 == 4.0: YAML may write an integer-valued float back as either


def diff_configs(old: dict[str, Any], new: dict[str, Any],
                 safe_keys: Collection[str] = SAFE_RESUME_KEYS) -> list[str]:
    """'key: old -> new' for every dotted setting that differs, except `safe_keys` (and keys under them)."""
    a, b = _flatten(old), _flatten(new)

    def safe(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in safe_keys)

    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if safe(key) or _same(x, y):
            continue
        show = [("(absent)" if v is missing else json.dumps(v, default=str)) for v in (x, y)]
        lines.append(f"{key}: {show[0]} -> {show[1]}")
    return lines


def check_resume_config(run_dir: str | Path, config: dict[str, Any],
                        safe_keys: Collection[str] = SAFE_RESUME_KEYS) -> None:
    """Raise ResumeConfigError when `config` differs from `<run_dir>/config.yaml` outside `safe_keys`.

    Without a saved config.yaml (runs of the Python API) there is nothing to compare; an unreadable one
    is reported as a warning, since the checkpoint itself is what a resume needs.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        warnings.warn(f"cannot read {saved_path} ({type(e).__name__}); resuming without checking the config",
                      stacklevel=2)
        return
    if not isinstance(saved, dict):
        return
    diffs = diff_configs(saved, config, safe_keys)
    if diffs:
        raise ResumeConfigError(
            f"cannot resume {run_dir}: the config differs from the one the run was started with: "
            f"{'; '.join(diffs)}. A resumed run may change only {', '.join(sorted(safe_keys))}; start a new "
            f"run with --set name=<new name> (or --overwrite to replace this one)")
