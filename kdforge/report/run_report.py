"""report.md for one run folder (final table, training curves) and tables aggregated over many."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdforge.engine.logging import read_metrics


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return "n/a" if v is None else str(v)


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and validation top-1 per epoch, side by side (matplotlib, Agg backend)."""
    epochs = [h for h in history if h.get("kind", "epoch") == "epoch"]
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [h["epoch"] for h in epochs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in sorted({k for h in epochs for k in h if k.startswith("train_")}):
        a.plot(xs, [h.get(key, float("nan")) for h in epochs], marker=".", label=key[6:])
    a.set_xlabel("epoch")
    a.set_title("training losses")
    a.legend(fontsize=7)
    if any("val_top1" in h for h in epochs):
        b.plot(xs, [h.get("val_top1", float("nan")) for h in epochs], marker=".", color="tab:green")
    b.set_xlabel("epoch")
    b.set_title("validation top-1 (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(cfg: Any, metrics: dict[str, Any], teacher_metrics: dict[str, Any] | None,
              history: list[dict[str, Any]]) -> dict[str, Any]:
    conf = cfg.to_dict()
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "data": cfg.data.name,
        "method": cfg.method.name,
        "method_options": conf["method"],
        "student": cfg.student.name,
        "teacher": cfg.teacher.name if cfg.teacher is not None and cfg.method.name != "scratch" else None,
        "epochs": cfg.train.epochs,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, list))},
        "teacher_metrics": teacher_metrics,
        "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in history),
    }


def write_run_report(run_dir: str | Path, cfg: Any, result: Any) -> Path:
    """summary.json, curves.png and report.md in `run_dir`."""
    run_dir = Path(run_dir)
    history = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"] or result.history
    summary = summarize(cfg, result.metrics, result.teacher_metrics, history)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot = plot_curves(history, run_dir / "curves.png")
    m, t = summary["metrics"], summary["teacher_metrics"] or {}
    lines = [f"# {cfg.name}", "",
             f"Method **{cfg.method.name}**, student `{cfg.student.name}`"
             + (f", teacher `{summary['teacher']}`" if summary["teacher"] else "")
             + f", data `{cfg.data.name}`, {cfg.train.epochs} epochs, seed {cfg.seed}.", "",
             "| model | top-1 (%) | top-5 (%) | val loss |", "| --- | --- | --- | --- |"]
    if summary["teacher"]:
        lines.append(f"| teacher `{summary['teacher']}` | {_fmt(t.get('top1'))} | {_fmt(t.get('top5'))} | "
                     f"{_fmt(t.get('loss'), 4)} |")
    lines.append(f"| student `{cfg.student.name}` | {_fmt(m.get('top1'))} | {_fmt(m.get('top5'))} | "
                 f"{_fmt(m.get('loss'), 4)} |")
    if "group_top1" in m:
        lines += ["", "Per-group top-1 (%): " + ", ".join(f"{v:.2f}" for v in m["group_top1"])
                  + f" (gap {m['group_gap']:.2f})"]
    lines += ["", f"Training time: {summary['train_time_s']:.1f} s.", ""]
    if history:
        keys = [k for k in history[-1] if k.startswith("train_")] + ["val_top1"]
        lines += ["## Per epoch", "", "| epoch | lr | " + " | ".join(keys) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
        for h in history:
            lines.append(f"| {h['epoch']} | {h.get('lr', 0):.4g} | "
                         + " | ".join(_fmt(h.get(k), 4) for k in keys) + " |")
        lines.append("")
    if plot is not None:
        lines += ["![training curves](curves.png)", ""]
    if (run_dir / "samples.png").exists():
        lines += ["A training batch as the student sees it:", "", "![training samples](samples.png)", ""]
    lines += ["The resolved configuration is in `config.yaml`; per-step and per-epoch metrics in `metrics.jsonl`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding summary.json) at or below each path, sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        if (p / "summary.json").exists():
            found.add(p)
        found.update(s.parent for s in p.rglob("summary.json"))
    return sorted(found)


def aggregate(paths: Iterable[str | Path], metric: str = "top1") -> str:
    """A Markdown table: one row per (data, teacher, student, method), mean ± std of `metric` over seeds."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError("no run folder with a summary.json under: " + ", ".join(map(str, paths)))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        key = (s["data"], s.get("teacher") or "-", s["student"], s["method"],
               json.dumps(s.get("method_options", {}), sort_keys=True))
        groups.setdefault(key, []).append(s)
    lines = [f"| data | teacher | student | method | teacher {metric} | student {metric} (mean ± std) | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (data, teacher, student, method, _), items in sorted(groups.items()):
        vals = [it["metrics"][metric] for it in items if metric in it["metrics"]]
        tvals = [it["teacher_metrics"][metric] for it in items if it.get("teacher_metrics")]
        mean = statistics.fmean(vals) if vals else float("nan")
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        tcol = f"{statistics.fmean(tvals):.2f}" if tvals else "-"
        lines.append(f"| {data} | {teacher} | {student} | {method} | {tcol} | {mean:.2f} ± {std:.2f} | "
                     f"{len(vals)} |")
    return "\n".join(lines) + "\n"
