"""`kdforge sweep`: many runs of one recipe, each a separate `kdforge distill|train` process, several at once.

A grid (the cartesian product of --grid values) times --seeds, or an Optuna search (--search optuna) where each
trial is one run per seed, scored by the mean of a metric. A run folder is named for what differs (the recipe's
name, the grid keys' values, the seed), so running the same sweep again skips finished runs and resumes
interrupted ones from their checkpoints.

    >>> sweep("recipes/mfd/utkface/mfd.yaml", {"method.mfd_weight": [1, 3, 10]}, [0, 1, 2], jobs=3,
    ...       metric="top1", select="deo_m", select_mode="min")  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdforge.config import ConfigError, RunConfig, check_kwargs, expand_path, load_config, parse_override
from kdforge.engine.run_folder import SWEEP_LOG, open_run_folder
from kdforge.report.common import RUN_ONLY_KEYS, flatten

VERBS = ("distill", "train")
LOG = SWEEP_LOG  # each run's stdout and stderr, appended to at every attempt, in its run folder
EXTENDABLE = ("train.epochs", "train.max_steps")  # a finished run differing only in these is resumed, not refused
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_LABEL = 100  # longer names are cut and keep a hash of the point, so they stay unique
_TAIL_LINES = 15


class SweepFailed(RuntimeError):
    """Some runs failed (the others ran to the end); `failed` names them, `run_dirs` are all of the sweep's."""

    def __init__(self, failed: list[str], run_dirs: list[Path]) -> None:
        super().__init__(f"{len(failed)} run{'s' * (len(failed) != 1)} failed: {', '.join(failed)} "
                         f"(logs: <run folder>/{LOG}); run the same sweep again to retry them")
        self.failed, self.run_dirs = failed, run_dirs


@dataclass
class SweepRun:
    name: str
    point: dict[str, Any]  # grid key -> value
    seed: int
    run_dir: Path
    overrides: list[str]  # the run's whole --set list
    action: str = "run"  # run | resume | done


# ------------------------------------------------------------------------------------------ grid and names
def split_values(text: str) -> list[str]:
    """'1,3,[0.5,0.5]' -> ['1', '3', '[0.5,0.5]']: commas inside brackets or quotes do not split."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, text[start:]]]


def to_yaml(value: Any) -> str:
    """The `--set` text that parses back to `value` (PyYAML reads 1e-05 as a string; its writer says 1.0e-05)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """['method.mfd_weight=1,3,10'] -> {'method.mfd_weight': [1, 3, 10]}, each value parsed as `--set` parses it."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, values = key.strip(), split_values(raw)
        if not sep or not key or "" in values:
            raise ValueError(f"--grid {item!r} must look like key.path=v1,v2,... with no empty value "
                             "(e.g. --grid method.temperature=2,4)")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice: list all its values in one --grid")
        grid[key] = [parse_override(f"{key}={v}")[1] for v in values]
        spelled = [to_yaml(v) for v in grid[key]]
        twice = next((s for i, s in enumerate(spelled) if s in spelled[:i]), None)
        if twice is not None:
            raise ValueError(f"--grid {key} lists {twice} twice")
    return grid


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed")
    return seeds


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, first key slowest: {'a': [1, 2], 'b': [3]} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}].
    An empty grid is one point: the recipe as it is (a sweep over seeds only)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def _value_text(value: Any) -> tuple[str, bool]:
    """A short filesystem-safe spelling of a value, and whether it alone tells the value apart (exact)."""
    exact = True
    if isinstance(value, float):
        text = f"{value:.4g}"
        exact = float(text) == value
    elif isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int)):
        text = to_yaml(value)
    else:  # lists and mappings
        text = json.dumps(value, separators=(",", ":"), default=str)
    safe = _UNSAFE.sub("-", text).strip("-") or "x"
    return safe, exact and safe == text


def run_name(base: str, point: dict[str, Any], seed: int) -> str:
    """'mfd' + {'method.mfd_weight': 3} + seed 0 -> 'mfd_mfd_weight3_s0': the last part of each key (the whole
    key where two share it) and its value, and a short hash of the point where a value had to be shortened
    (optuna's floats) or made filesystem-safe, so two points never share a folder."""
    last = [k.rsplit(".", 1)[-1] for k in point]
    parts, exact = [], True
    for (key, value), short in zip(point.items(), last):
        text, ok = _value_text(value)
        exact &= ok
        parts.append((short if last.count(short) == 1 else key) + (text if text[0].isdigit() else f"-{text}"))
    label = "_".join([base, *parts])
    if not exact or len(label) > _MAX_LABEL:
        digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:6]
        label = f"{label[:_MAX_LABEL]}_{digest}"
    return f"{label}_s{seed}"  # `_s<seed>` is what `kdforge report` strips to label a row


# ------------------------------------------------------------------------------------------ planning
def sweep_folder(recipe: str | Path, overrides: Sequence[str],
                 out_dir: str | Path | None) -> tuple[RunConfig, str, Path]:
    """The recipe's config, the base of its run names and the sweep folder (default <out_dir>/<name>_sweep)."""
    cfg = load_config(recipe, list(overrides))
    base = cfg.name if cfg.name != RunConfig.name else Path(recipe).stem  # unnamed recipes go by their file
    base = _UNSAFE.sub("-", base).strip("-") or "run"
    if out_dir:
        return cfg, base, Path(expand_path(str(out_dir)))
    return cfg, base, Path(expand_path(cfg.out_dir)) / f"{base}_sweep"


def plan_run(recipe: str | Path, overrides: Sequence[str], base: str, folder: Path, point: dict[str, Any],
             seed: int) -> SweepRun:
    """One run of the sweep, its config loaded and validated now (unknown keys, bad values, method options), and
    what to do with its folder: run it, resume it, or nothing (finished)."""
    name = run_name(base, point, seed)
    sets = [*overrides, *(f"{k}={to_yaml(v)}" for k, v in point.items()), f"seed={seed}", f"name={to_yaml(name)}",
            f"out_dir={to_yaml(str(folder))}"]
    try:
        cfg = load_config(recipe, sets)
        _check_options(cfg, point)
    except ConfigError as e:
        raise ConfigError(f"sweep run {name}: {e}") from None
    run = SweepRun(name, point, seed, folder / name, sets)
    run.action = _action(run.run_dir, cfg.to_dict())
    return run


def _check_options(cfg: RunConfig, keys: Iterable[str]) -> None:
    """Keys the config loader passes through as options (method.x, student.x, teacher.x) must be options of that
    method or model: checked here, so a typo fails once before the sweep rather than in every run."""
    import kdforge  # noqa: F401  (registers the methods and models)
    from kdforge.registry import DISTILLERS, MODELS, RegistryError

    for key in keys:
        section, _, option = key.partition(".")
        part = getattr(cfg, section, None) if section in ("method", "student", "teacher") else None
        if part is None or option not in part.kwargs:
            continue
        try:
            fn = (DISTILLERS if section == "method" else MODELS).get(part.name)
        except RegistryError:
            continue  # an unknown method or model fails in its own run, named there
        check_kwargs(fn, {option: None}, f"{section} {part.name!r} (sweep key {key})")


def _action(run_dir: Path, expected: dict[str, Any]) -> str:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        holds_run = any((run_dir / "checkpoints" / f).is_file() for f in ("last.pt", "previous.pt"))
        return "resume" if holds_run else "run"  # `kdforge distill --resume` needs one of these checkpoints
    saved, wanted = (flatten(json.loads(json.dumps(c, default=str))) for c in (summary["config"], expected))
    differ = sorted(k for k in saved.keys() & wanted.keys() if k not in RUN_ONLY_KEYS and saved[k] != wanted[k])
    if not differ:
        return "done"
    if set(differ) <= set(EXTENDABLE):
        return "resume"  # trained for longer than before: continues from its last checkpoint
    what = "; ".join(f"{k}: {saved[k]!r} there, {wanted[k]!r} here" for k in differ[:4])
    raise ConfigError(f"{run_dir} holds a finished run with other settings ({what}); delete it or sweep into "
                      "another --out-dir")


# ------------------------------------------------------------------------------------------ running
def threads_each(jobs: int) -> int:
    """The machine's cores split between `jobs` concurrent runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def run_all(runs: list[SweepRun], *, recipe: str | Path, verb: str, jobs: int, threads: int,
            echo: Callable[[str], None] = print, tag: str = "") -> list[SweepRun]:
    """Run those not finished, at most `jobs` at once, each `python -m kdforge <verb> <recipe> --set ...` (with
    --resume where it continues one) writing into <run folder>/sweep.log; returns the failed ones, each reported
    with its exit code and the end of its log, after the others have finished."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    todo = [r for r in runs if r.action != "done"]
    lock, counter = threading.Lock(), itertools.count(1)

    def one(run: SweepRun) -> int:
        start = time.monotonic()
        code, tail = _launch(run, recipe, verb, env)
        with lock:
            n = f"{tag}[{next(counter)}/{len(todo)}]"
            if code == 0:
                echo(f"{n} {run.name}: finished in {time.monotonic() - start:.0f} s")
            else:
                log = run.run_dir / LOG
                echo(f"{n} {run.name}: FAILED (exit code {code})" + (f"; the end of {log}:" if log.is_file() else ":")
                     + "".join(f"\n    {line}" for line in tail))
        return code

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        codes = list(pool.map(one, todo))
    return [r for r, code in zip(todo, codes) if code != 0]


def _launch(run: SweepRun, recipe: str | Path, verb: str, env: dict[str, str]) -> tuple[int, list[str]]:
    cmd = [sys.executable, "-m", "kdforge", verb, str(recipe), *(x for o in run.overrides for x in ("--set", o))]
    if run.action == "resume":
        cmd.append("--resume")
    else:
        try:  # create and mark the folder as the run itself would, so that the log can live in it from the start
            open_run_folder(run.run_dir.parent, run.name, resume=False, overwrite=False).close()
        except (OSError, ValueError) as e:  # a folder that is not kdforge's, or one in use
            return 2, [f"not started: {e}"]
    log = run.run_dir / LOG
    with open(log, "a") as f:
        f.write(f"==> {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return code, lines[-_TAIL_LINES:]


def print_report(run_dirs: list[Path], *, metric: str | None, mode: str | None, select: str | None,
                 select_mode: str | None, echo: Callable[[str], None] = print) -> None:
    """`kdforge report` over the sweep's finished runs (and only those: the folder may hold others)."""
    from kdforge.report import aggregate

    finished = [d for d in run_dirs if (d / "summary.json").is_file()]
    if not finished:
        echo("no run of the sweep has finished: no table")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = aggregate(finished, metric=metric, mode=mode, select=select, select_mode=select_mode)
    for w in caught:
        echo(f"warning: {w.message}")
    echo(table)


def _check(verb: str, seeds: Sequence[int], jobs: int, threads: int | None) -> None:
    if verb not in VERBS:
        raise ValueError(f"verb must be one of {', '.join(VERBS)}, got {verb!r}")
    if not seeds:
        raise ValueError("a sweep needs at least one seed")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def sweep(recipe: str | Path, grid: dict[str, list[Any]], seeds: Sequence[int] | None = None, *, jobs: int = 1,
          verb: str = "distill", out_dir: str | Path | None = None, overrides: Sequence[str] = (),
          threads: int | None = None, metric: str | None = None, mode: str | None = None, select: str | None = None,
          select_mode: str | None = None, echo: Callable[[str], None] = print) -> list[Path]:
    """Run every point of `grid` (key -> values, as `--set` would parse them) with every seed (default: the
    recipe's), `jobs` at once with `threads` CPU threads each (default: the cores split between them), into
    `out_dir` (default <recipe out_dir>/<name>_sweep); then print the `kdforge report` table of its runs.

    Every run's config is validated before any starts. Finished runs are skipped and interrupted ones resumed,
    so the same call again completes a sweep. Returns the run folders; raises SweepFailed (after the table)
    when some run failed.
    """
    cfg, base, folder = sweep_folder(recipe, overrides, out_dir)
    seeds = [cfg.seed] if seeds is None else list(seeds)
    _check(verb, seeds, jobs, threads)
    points = expand_grid(grid)
    runs = [plan_run(recipe, overrides, base, folder, point, seed) for point in points for seed in seeds]
    threads = threads or threads_each(jobs)
    done, resume = (sum(r.action == a for r in runs) for a in ("done", "resume"))
    echo(f"sweep: {len(runs)} runs ({len(points)} grid point{'s' * (len(points) != 1)} x {len(seeds)} seed"
         f"{'s' * (len(seeds) != 1)}) in {folder}: {done} finished already, {len(runs) - done} to run "
         f"({resume} resumed), {jobs} at a time with {threads} CPU thread{'s' * (threads != 1)} each")
    failed = run_all(runs, recipe=recipe, verb=verb, jobs=jobs, threads=threads, echo=echo)
    run_dirs = [r.run_dir for r in runs]
    print_report(run_dirs, metric=metric, mode=mode, select=select, select_mode=select_mode, echo=echo)
    if failed:
        raise SweepFailed([r.name for r in failed], run_dirs)
    return run_dirs


# ------------------------------------------------------------------------------------------ optuna search
@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range (log-uniform with `log`) or a list of choices."""

    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def ends(self) -> list[Any]:
        """The values checked before the search: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def parse_space(items: Iterable[str]) -> dict[str, Param]:
    """--space key=low:high[:log] (float), key=int:low:high[:log] (integer), key=a,b,c (choices, parsed as
    `--set` parses values)."""
    space: dict[str, Param] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        usage = (f"--space {item!r} must look like key=low:high[:log] (float), key=int:low:high[:log] or "
                 "key=a,b,c (choices)")
        if not sep or not key or not raw.strip():
            raise ValueError(usage)
        if key in space:
            raise ValueError(f"--space {key} is given twice")
        values = split_values(raw)
        if len(values) > 1 or ":" not in raw:
            choices = tuple(parse_override(f"{key}={v}")[1] for v in values)
            if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise ValueError(f"--space {item!r}: Optuna's choices must be numbers, strings, booleans or null")
            space[key] = Param("categorical", choices=choices)
            continue
        parts = raw.strip().split(":")
        kind = "int" if parts[0] == "int" else "float"
        parts = parts[1:] if kind == "int" else parts
        log = parts[-1] == "log"
        parts = parts[:-1] if log else parts
        try:
            low, high = (int(p) if kind == "int" else float(p) for p in parts)
        except ValueError:
            raise ValueError(usage) from None
        if not low < high or (log and low <= 0):
            raise ValueError(f"--space {item!r}: needs low < high" + (" and low > 0 (log scale)" if log else ""))
        space[key] = Param(kind, low, high, log)
    return space


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("--search optuna needs Optuna: pip install 'kdforge[sweep]' (or pip install 'optuna>=3')") \
            from None
    return optuna


def _storage(optuna: Any, path: Path) -> Any:
    """SQLite storage with heartbeats: a trial whose process died is failed and retried (same values, so its
    runs resume from their checkpoints) once its heartbeat is stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9
        if retry is not None:
            return optuna.storages.RDBStorage(f"sqlite:///{path}", heartbeat_interval=60,
                                              heartbeat_stale_trial_callback=retry(max_retry=3))
        return optuna.storages.RDBStorage(f"sqlite:///{path}", heartbeat_interval=60,
                                          failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=3))


def metric_of(run_dir: Path, metric: str) -> float:
    """The final value of `metric` in a run's summary.json; an unknown name fails naming the ones there."""
    from kdforge.registry import did_you_mean
    from kdforge.report.common import scalar_names, to_number

    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    value = to_number(metrics.get(metric))
    if value is None:
        names = scalar_names(metrics)
        raise ValueError(f"unknown metric {metric!r}{did_you_mean(metric, names)} (metrics of {run_dir.name}: "
                         f"{', '.join(names)})")
    return value


def search(recipe: str | Path, space: dict[str, Param], seeds: Sequence[int] | None = None, *, trials: int,
           metric: str, mode: str | None = None, jobs: int = 1, verb: str = "distill",
           out_dir: str | Path | None = None, overrides: Sequence[str] = (), threads: int | None = None,
           select: str | None = None, select_mode: str | None = None,
           echo: Callable[[str], None] = print) -> list[Path]:
    """An Optuna study over `space`: each trial is one run per seed, its value the mean of `metric` (maximised or
    minimised by `mode`, default by the metric's name) over their summary.json files; `jobs` trials at once.

    The study is stored in <sweep folder>/optuna.db, so `trials` counts the completed trials wanted in all: a
    search stopped and started again continues where it was. Returns the run folders of the study's trials;
    raises SweepFailed when a run of this call failed (its trial is failed, the search goes on).
    """
    from kdforge.metrics.evaluators import guess_mode

    optuna = _import_optuna()
    cfg, base, folder = sweep_folder(recipe, overrides, out_dir)
    seeds = [cfg.seed] if seeds is None else list(seeds)
    _check(verb, seeds, jobs, threads)
    if not space:
        raise ValueError("--search optuna needs at least one --space key=...")
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    mode = mode or guess_mode(metric)
    firsts = {k: p.ends()[0] for k, p in space.items()}
    for key, p in space.items():  # every end of every range makes a valid config, before any trial runs
        for value in p.ends():
            plan_run(recipe, overrides, base, folder, {**firsts, key: value}, seeds[0])
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=_storage(optuna, folder / "optuna.db"), study_name=base, load_if_exists=True,
                                direction="maximize" if mode == "max" else "minimize")
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    left = max(0, trials - complete)
    threads = threads or threads_each(jobs)
    echo(f"search: {trials} trials of {len(seeds)} run{'s' * (len(seeds) != 1)} each in {folder} (study "
         f"{folder / 'optuna.db'}): {complete} complete already, {left} to run, {jobs} at a time with {threads} CPU "
         f"thread{'s' * (threads != 1)} a run; objective: mean {metric} ({mode})")
    failed: list[str] = []

    def objective(trial: Any) -> float:
        point = {key: _suggest(trial, key, p) for key, p in space.items()}
        runs = [plan_run(recipe, overrides, base, folder, point, seed) for seed in seeds]
        trial.set_user_attr("runs", [r.name for r in runs])
        bad = run_all(runs, recipe=recipe, verb=verb, jobs=1, threads=threads, echo=echo, tag=f"trial {trial.number} ")
        if bad:
            failed.extend(r.name for r in bad)
            raise SweepFailed([r.name for r in bad], [r.run_dir for r in runs])
        return statistics.fmean(metric_of(r.run_dir, metric) for r in runs)

    study.optimize(objective, n_trials=left, n_jobs=jobs, catch=(SweepFailed,))
    names = dict.fromkeys(n for t in study.get_trials(deepcopy=False) for n in t.user_attrs.get("runs", []))
    run_dirs = [folder / n for n in names]
    print_report(run_dirs, metric=metric, mode=mode, select=select or metric,
                 select_mode=select_mode if select else mode, echo=echo)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        echo(f"best trial: #{best.number}, mean {metric} {best.value:.6g}, "
             + ", ".join(f"{k}={v!r}" for k, v in best.params.items()))
    if failed:
        raise SweepFailed(failed, run_dirs)
    return run_dirs


def _suggest(trial: Any, key: str, p: Param) -> Any:
    if p.kind == "float":
        return trial.suggest_float(key, p.low, p.high, log=p.log)
    if p.kind == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_categorical(key, list(p.choices))
