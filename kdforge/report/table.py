"""Many run folders -> one Markdown table: a row per experiment (its configuration minus seed), mean ± std over
seeds, the best seed, and the teacher's value of the same metric."""
from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdforge.metrics.evaluators import guess_mode
from kdforge.registry import did_you_mean
from kdforge.report.common import (
    check_mode,
    config_hash,
    decimals_for,
    experiment_fields,
    fmt,
    list_names,
    scalar_names,
    strip_seed,
    to_number,
)

# data settings that change only the training inputs: the teacher's validation numbers do not depend on them
_TRAIN_ONLY_DATA = ("root", "eval_batch_size", "batch_size", "crop_pad", "flip", "train_split", "train_subset",
                    "train_name", "train_source", "train_options", "train_select", "data_free_steps")
_MAX_LABEL_OPTIONS = 4


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]  # the resolved config, or as much of it as an old summary allows
    run_id: str  # the experiment with its seed: copies of a folder share it
    group_id: str  # the experiment without its seed: the table row


@dataclass
class RunSet:
    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (summary.json, why)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (ignored folder, the one counted)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding summary.json) at or below each path, sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        found.update(s.parent for s in p.rglob("summary.json"))
        if (p / "summary.json").exists():
            found.add(p)
    return sorted(found)


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        s = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cut off or not JSON: {e.msg.lower()} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(s, dict) or not isinstance(s.get("metrics"), dict):
        raise ValueError("no 'metrics' mapping in it")
    return s


def _config_of(run_dir: Path, s: dict[str, Any]) -> dict[str, Any]:
    """The run's config: from summary.json, else config.yaml beside it, else the summary's own fields."""
    if isinstance(s.get("config"), dict):
        return s["config"]
    try:
        conf = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(conf, dict):
            return conf
    except (OSError, yaml.YAMLError):
        pass
    return {"seed": s.get("seed"), "data": {"name": s.get("data")}, "student": {"name": s.get("student")},
            "teacher": {"name": s["teacher"]} if s.get("teacher") else None,
            "method": s.get("method_options") or {"name": s.get("method")}, "train": {"epochs": s.get("epochs")}}


def load_runs(paths: Iterable[str | Path]) -> RunSet:
    """Every readable run under `paths`, each experiment-and-seed once; unreadable summaries are skipped with a
    warning naming the file, copies of a run (same run_id) are counted once."""
    paths = list(paths)
    folders = find_runs(paths)
    if not folders:
        raise FileNotFoundError("no run folder with a summary.json under: " + ", ".join(map(str, paths)))
    out = RunSet()
    seen: dict[str, Path] = {}
    for folder in folders:
        path = folder / "summary.json"
        try:
            s = _read_summary(path)
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            out.skipped.append((path, str(e)))
            continue
        config = _config_of(folder, s)
        run_id = s.get("run_id") or config_hash(config)
        if run_id in seen:
            out.duplicates.append((folder, seen[run_id]))
            continue
        seen[run_id] = folder
        out.runs.append(Run(folder, s, config, run_id, config_hash(config, with_seed=False)))
    if not out.runs:
        raise ValueError(f"none of the {len(folders)} summary.json files under {', '.join(map(str, paths))} "
                         "could be read")
    return out


def _choose_metric(runs: list[Run], metric: str | None) -> str:
    scalars = list(dict.fromkeys(n for r in runs for n in scalar_names(r.summary["metrics"])))
    if not scalars:
        raise ValueError("the runs hold no scalar metric to tabulate")
    if metric is None:  # the metric the runs were monitored on, else top-1, else the first one
        monitors = Counter((r.summary.get("monitor") or {}).get("name") for r in runs)
        ranked = [m for m, _ in monitors.most_common() if m in scalars]
        return ranked[0] if ranked else "top1" if "top1" in scalars else scalars[0]
    if metric in scalars:
        return metric
    lists = {n for r in runs for n in list_names(r.summary["metrics"])}
    if metric in lists:
        raise ValueError(f"metric {metric!r} is a list (one value per group or channel) and cannot be averaged; "
                         f"pick a scalar: {', '.join(scalars)}")
    raise ValueError(f"unknown metric {metric!r}{did_you_mean(metric, scalars)} "
                     f"(metrics in these runs: {', '.join(scalars)})")


def _choose_mode(runs: list[Run], metric: str, mode: str | None) -> str:
    if mode is not None:
        return check_mode(mode)
    modes = Counter((r.summary.get("monitor") or {}).get("mode") for r in runs
                    if (r.summary.get("monitor") or {}).get("name") == metric)
    ranked = [m for m, _ in modes.most_common() if m in ("max", "min")]
    return ranked[0] if ranked else guess_mode(metric)


def _teacher_key(config: dict[str, Any]) -> str | None:
    """Same teacher on the same validation data: runs that share this share the teacher's numbers."""
    teacher = config.get("teacher")
    if not teacher:
        return None
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in _TRAIN_ONLY_DATA}
    scorer = {k: v for k, v in (config.get("eval") or {}).items() if k not in ("monitor", "mode")}
    return json.dumps([teacher, data, scorer], sort_keys=True, default=str)


def _labels(groups: dict[str, list[Run]]) -> dict[str, str]:
    """Recipe name without its seed suffix; where two experiments would share a label, the options that differ."""
    base = {}
    for gid, runs in groups.items():
        names = Counter(strip_seed(str(r.summary.get("name", "run"))) for r in runs)
        base[gid] = sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    buckets: dict[tuple, list[str]] = {}
    for gid, runs in groups.items():
        s = runs[0].summary
        buckets.setdefault((s.get("data"), s.get("teacher"), s.get("student"), s.get("method"), base[gid]),
                           []).append(gid)
    labels = dict(base)
    for gids in buckets.values():
        if len(gids) < 2:
            continue
        fields = {gid: experiment_fields(groups[gid][0].config, with_seed=False) for gid in gids}
        keys = sorted({k for f in fields.values() for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in fields.values()}) > 1]
        for gid in gids:
            opts = [f"{k.removeprefix('method.')}={fields[gid].get(k)}" for k in differ[:_MAX_LABEL_OPTIONS]]
            if len(differ) > _MAX_LABEL_OPTIONS:
                opts.append("…")
            labels[gid] = f"{base[gid]} ({', '.join(opts) if opts else gid[:8]})"
    return labels


def _values(runs: list[Run], metric: str, key: str) -> list[float]:
    vals = [to_number((r.summary.get(key) or {}).get(metric)) for r in runs]
    return [v for v in vals if v is not None]


def _finite_mean(vals: list[float]) -> float | None:
    finite = [v for v in vals if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _select_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The row with the best mean of the selecting metric (ties: the first in table order)."""
    candidates = sorted((r for r in rows if r["select"] is not None), key=lambda r: r["key"])
    if not candidates:
        return None
    return (max if mode == "max" else min)(candidates, key=lambda r: r["select"])


def _selected_line(row: dict[str, Any] | None, select: str, mode: str, decimals: int | None) -> str:
    better = "highest" if mode == "max" else "lowest"
    if row is None:
        return f"Selected: none (no row has a finite {select})."
    data, _, student, method, label = row["key"]
    return (f"Selected: {label} ({method}, {student} on {data}): the {better} mean {select} over its seeds, "
            f"{fmt(row['select'], decimals, select)}.")


def aggregate(paths: Iterable[str | Path], metric: str | None = None, *, mode: str | None = None,
              select: str | None = None, select_mode: str | None = None) -> str:
    """A Markdown table of the runs under `paths`: one row per experiment (configuration minus seed), with the
    teacher's value of `metric`, the student's mean ± std over seeds, the number of seeds and the best seed.

    `metric` defaults to the runs' monitor metric; `mode` ("max"/"min") to the runs' monitor mode for it, else
    "min" for loss-, error- and distance-like names. An unknown metric raises ValueError with the closest names.
    `select` names a metric (it may differ from `metric`: show accuracy, select by DEO_M) whose mean over seeds
    picks the best row, by `select_mode` (defaulting as `mode` does): the row is marked in bold, a column shows
    that mean when it is not `metric`'s, and a line under the table names the row.
    """
    found = load_runs(paths)
    runs = found.runs
    metric = _choose_metric(runs, metric)
    mode = _choose_mode(runs, metric, mode)
    if select is not None:
        select = _choose_metric(runs, select)
        select_mode = _choose_mode(runs, select, select_mode)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group_id, []).append(r)
    # one evaluation of a teacher serves every run with that teacher on that validation data
    teacher_pool: dict[str, list[float]] = {}
    for r in runs:
        tk = _teacher_key(r.config)
        if tk is not None:
            teacher_pool.setdefault(tk, []).extend(_values([r], metric, "teacher_metrics"))
    labels = _labels(groups)

    rows, left_out = [], 0
    for gid, members in groups.items():
        vals = _values(members, metric, "metrics")
        tvals = _values(members, metric, "teacher_metrics") or teacher_pool.get(_teacher_key(members[0].config), [])
        if not vals and not tvals:
            left_out += len(members)
            continue
        finite = [v for v in vals if v == v and abs(v) != float("inf")]
        s = members[0].summary
        rows.append({"key": (str(s.get("data")), str(s.get("teacher") or "-"), str(s.get("student")),
                             str(s.get("method")), labels[gid]),
                     "teacher": statistics.fmean(tvals) if tvals else None,
                     "mean": statistics.fmean(vals) if vals else None,
                     "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals),
                     "best": (max if mode == "max" else min)(finite) if finite else None,
                     "select": _finite_mean(_values(members, select, "metrics")) if select else None})
    d = decimals_for([v for row in rows for v in (row["mean"], row["teacher"], row["best"]) if v is not None], metric)
    better = "higher" if mode == "max" else "lower"
    chosen = _select_row(rows, select_mode) if select else None
    extra = select is not None and select != metric  # the selecting metric gets a column of its own
    d_sel = decimals_for([r["select"] for r in rows if r["select"] is not None], select) if extra else None
    lines = [f"| data | teacher | student | method | run | teacher {metric} | student {metric} (mean ± std over seeds) "
             f"| seeds | best ({mode}) |" + (f" {select} (mean, {select_mode}) |" if extra else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if extra else "")]
    for row in sorted(rows, key=lambda r: r["key"]):
        student = fmt(row["mean"], d, metric) + (f" ± {fmt(row['std'], d, metric)}" if row["std"] is not None else "")
        key = [*row["key"][:4], f"**{row['key'][4]}**" if row is chosen else row["key"][4]]
        lines.append("| " + " | ".join([*key, fmt(row["teacher"], d, metric), student, str(row["n"]),
                                        fmt(row["best"], d, metric)]
                                       + ([fmt(row["select"], d_sel, select)] if extra else [])) + " |")
    notes = [f"Final {metric} of each run; {better} is better; best = the best seed's value. Rows are "
             "experiments (configuration minus seed), labelled by recipe name."]
    if select:
        notes.insert(0, _selected_line(chosen, select, select_mode, d if select == metric else d_sel))
    if left_out:
        notes.append(f"Left out {left_out} run{'s' * (left_out != 1)} without {metric!r}.")
    if found.duplicates:
        pairs = "; ".join(f"{dup} (= {kept})" for dup, kept in found.duplicates)
        notes.append(f"Ignored {len(found.duplicates)} duplicate run folder{'s' * (len(found.duplicates) != 1)} "
                     f"(same run_id as one counted): {pairs}.")
    if found.skipped:
        what = "; ".join(f"{p} ({why})" for p, why in found.skipped)
        notes.append(f"Skipped {len(found.skipped)} run{'s' * (len(found.skipped) != 1)} whose summary.json could "
                     f"not be read: {what}.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
