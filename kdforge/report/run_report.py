"""One run folder's summary.json, curves.png and report.md, driven by whatever metrics the evaluator returned."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from kdforge.config import atomic_write_text
from kdforge.engine.logging import read_metrics
from kdforge.report.common import (
    check_mode,
    clean_metrics,
    config_hash,
    decimals_for,
    fmt,
    label_names,
    list_names,
    method_uses_teacher,
    metric_label,
    scalar_names,
    to_number,
)
from kdforge.report.fairness_plots import group_accuracy_bars

_MAX_LIST_ROWS = 64  # longer list metrics stay in summary.json only
_GROUP_TABLE = "group_class_top1"  # a [group][class] accuracy table (fairness evaluator): drawn as bars


def epoch_history(run_dir: Path, result: Any) -> list[dict[str, Any]]:
    """Per-epoch records from metrics.jsonl (else result.history), one per epoch, the last one logged winning."""
    records = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    if not records:
        records = [h for h in (getattr(result, "history", None) or []) if h.get("kind", "epoch") == "epoch"]
    by_epoch: dict[Any, dict[str, Any]] = {}
    for i, r in enumerate(records):
        by_epoch[r.get("epoch", i + 1)] = r
    return list(by_epoch.values())


def best_of(history: list[dict[str, Any]], metrics: dict[str, Any], monitor: str, mode: str) -> dict[str, Any]:
    """The best validation value of `monitor` over the epochs (earliest on ties), and its epoch."""
    seen = [(h.get("epoch"), to_number(h.get(f"val_{monitor}"))) for h in history]
    seen = [(e, v) for e, v in seen if v is not None and math.isfinite(v)]
    best, epoch = None, None
    if seen:
        epoch, best = (max if mode == "max" else min)(seen, key=lambda ev: ev[1])
    elif to_number(metrics.get(monitor)) is not None:  # no per-epoch record: the final value is all we have
        best = to_number(metrics[monitor])
    return {"name": monitor, "mode": mode, "best": best, "best_epoch": epoch}


def _networks(result: Any) -> dict[str, int]:
    """Parameter counts of the trained networks (result.networks, else the student)."""
    nets = getattr(result, "networks", None)
    if not nets:
        student = getattr(result, "student", None)
        nets = {"student": student} if student is not None else {}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in nets.items() if hasattr(m, "parameters")}


def _cost(result: Any) -> dict[str, dict[str, int]]:
    """Parameters and multiply-accumulates of one forward pass (FlopCounterMode) of the teacher and the student, for
    methods that know their networks' input (`input_shape`: (C, H, W) of an image, or (z_dim,) of a code)."""
    import torch

    from kdforge.models.cost import count_macs

    distiller = getattr(result, "distiller", None)
    shape = getattr(distiller, "input_shape", None)
    if not shape:
        return {}
    out = {}
    for name in ("teacher", "student"):
        net = getattr(distiller, name, None)
        if net is None:
            continue
        was = net.training
        net.eval()
        try:
            device = next(net.parameters()).device
            macs = count_macs(net, torch.zeros(1, *shape, device=device))
        except Exception:  # noqa: BLE001  (a cost figure is never worth failing a finished run's report)
            continue
        finally:
            net.train(was)
        out[name] = {"params": sum(p.numel() for p in net.parameters()), "macs": macs}
    return out


def summarize(cfg: Any, result: Any, history: list[dict[str, Any]], *, monitor: str = "top1", mode: str = "max",
              evaluator: str = "classification") -> dict[str, Any]:
    """What summary.json holds: identity, configuration, final metrics (student and teacher), best, sizes, time."""
    conf = cfg.to_dict()
    metrics = clean_metrics(result.metrics) or {}
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "run_id": config_hash(conf),  # same experiment and seed -> same id, wherever the folder is copied
        "data": cfg.data.name,
        "method": cfg.method.name,
        "method_options": conf["method"],
        "student": cfg.student.name,
        "teacher": cfg.teacher.name if cfg.teacher is not None and method_uses_teacher(cfg.method.name) else None,
        "epochs": cfg.train.epochs,
        "evaluator": evaluator,
        "metrics": metrics,
        "teacher_metrics": clean_metrics(getattr(result, "teacher_metrics", None)),
        "monitor": best_of(history, metrics, monitor, mode),
        "params": _networks(result),
        "cost": _cost(result),
        "train_time_s": sum(to_number(h.get("epoch_time_s")) or 0.0 for h in history),
        "stopped_early": bool(getattr(result, "stopped_early", False)),
        "config": conf,
    }


def curves_figure(history: list[dict[str, Any]], monitor: str = "top1", mode: str = "max"):
    """A matplotlib Figure: training losses per epoch, and the validation `monitor` with its best epoch marked."""
    if not history:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    xs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    losses = list(dict.fromkeys(k for h in history for k in h if k.startswith("train_")))
    mon = [to_number(h.get(f"val_{monitor}")) for h in history]
    has_mon = any(v is not None for v in mon)
    fig = Figure(figsize=(9 if has_mon else 4.5, 3.2))
    axes = fig.subplots(1, 2) if has_mon else [fig.subplots(1, 1)]
    a = axes[0]
    for key in losses:
        ys = [to_number(h.get(key)) for h in history]
        a.plot(xs, [math.nan if y is None else y for y in ys], marker=".", label=key[len("train_"):])
    a.set_title("training losses")
    if losses:
        a.legend(fontsize=7)
    if has_mon:
        b = axes[1]
        ys = [math.nan if v is None else v for v in mon]
        b.plot(xs, ys, marker=".", color="tab:green")
        best = best_of(history, {}, monitor, mode)
        title = f"validation {metric_label(monitor)}"
        if best["best"] is not None:
            b.plot([best["best_epoch"]], [best["best"]], marker="*", markersize=12, color="tab:red", linestyle="")
            title += f": best {fmt(best['best'], name=monitor)} at epoch {best['best_epoch']}"
        b.set_title(title)
    for ax in axes:
        ax.set_xlabel("epoch")
        if len(xs) <= 12:  # whole epochs as ticks; a locator would draw 0.95..1.05 around a single epoch
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict[str, Any]], path: Path, monitor: str = "top1", mode: str = "max") -> Path | None:
    """curves.png: training losses and the validation monitor metric per epoch; None without epochs."""
    fig = curves_figure(history, monitor, mode)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return Path(path)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                                 for r in rows]


def _model_table(summary: dict[str, Any]) -> list[str]:
    """Teacher and student rows, a column per scalar metric either returned."""
    m, t = summary["metrics"], summary["teacher_metrics"]
    names = list(dict.fromkeys(scalar_names(m) + scalar_names(t)))
    if not names:
        return ["No validation metrics were recorded (no validation data?)."]
    models = [(f"student `{summary['student']}`", m)]
    if t is not None:
        models.insert(0, (f"teacher `{summary['teacher'] or 'teacher'}`", t))
    decimals = {n: decimals_for([to_number(d.get(n)) for _, d in models if d.get(n) is not None], n) for n in names}
    rows = [[label] + [fmt(d.get(n), decimals[n], n) for n in names] for label, d in models]
    return _md_table(["model"] + [metric_label(n) for n in names], rows)


def _list_tables(summary: dict[str, Any]) -> list[str]:
    """A small table per list metric (per-group accuracy, per-channel PSNR, ...): index, teacher, student."""
    m, t = summary["metrics"], summary["teacher_metrics"] or {}
    lines: list[str] = []
    for name in dict.fromkeys(list_names(m) + list_names(t)):
        cols = [(who, d[name]) for who, d in (("teacher", t), ("student", m)) if isinstance(d.get(name), list)]
        if any(isinstance(x, list) for _, v in cols for x in v):  # a 2-D table: drawn (or kept in summary.json)
            continue
        n = max(len(v) for _, v in cols)
        label = metric_label(name)
        lines += [(f"{label} (`{name}`)" if label != name else f"`{name}`") + ", one value per index:", ""]
        if n > _MAX_LIST_ROWS:
            lines += [f"{n} values; see summary.json.", ""]
            continue
        flat = [to_number(x) for _, v in cols for x in v]
        d = decimals_for([x for x in flat if x is not None], name)
        rows = [[str(i)] + [fmt(v[i], d, name) if i < len(v) else "-" for _, v in cols] for i in range(n)]
        lines += _md_table(["index"] + [who for who, _ in cols], rows) + [""]
    return lines


def _group_accuracy_charts(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """group_accuracy.png (and group_accuracy_teacher.png) from a per-(group, class) accuracy table in the
    metrics (the fairness evaluator's `group_class_top1`), with the Markdown that embeds them."""
    lines: list[str] = []
    for who, d, file in (("teacher", summary["teacher_metrics"] or {}, "group_accuracy_teacher.png"),
                         ("student", summary["metrics"], "group_accuracy.png")):
        table = d.get(_GROUP_TABLE)
        if not (isinstance(table, list) and table and all(isinstance(r, list) for r in table)):
            continue
        group_accuracy_bars(table, run_dir / file, title=f"{who}: accuracy per class and group (%)")
        lines += [f"Accuracy of the {who} per class and group (`{_GROUP_TABLE}`; values in summary.json):", "",
                  f"![{who} accuracy per class and group]({file})", ""]
    return lines


def _epoch_samples(run_dir: Path) -> list[str]:
    """The method's image grids from samples/<name>_epoch<E>.png (Distiller.epoch_snapshot): first, middle and last
    epoch of each name."""
    grids: dict[str, list[tuple[int, str]]] = {}
    for f in sorted((run_dir / "samples").glob("*_epoch[0-9][0-9][0-9].png")) if (run_dir / "samples").is_dir() else []:
        name, epoch = f.stem.rsplit("_epoch", 1)
        grids.setdefault(name, []).append((int(epoch), f"samples/{f.name}"))
    lines: list[str] = []
    for name, shots in grids.items():
        picks = list(dict.fromkeys([shots[0], shots[len(shots) // 2], shots[-1]]))
        epochs = ", ".join(str(e) for e, _ in picks)
        lines += [f"`{name}` over training (epochs {epochs}; every epoch in samples/):", "",
                  " ".join(f"![{name} epoch {e}]({rel})" for e, rel in picks), ""]
    return lines


def _epoch_histograms(history: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """A bar chart per `*_hist` value of the epoch records (e.g. the teacher's class histogram on a generator's
    samples): first and last epoch side by side."""
    names = list(dict.fromkeys(k for h in history for k, v in h.items() if k.endswith("_hist") and isinstance(v, list)))
    lines: list[str] = []
    for name in names:
        seen = [(h.get("epoch"), h[name]) for h in history if isinstance(h.get(name), list)]
        picks = list(dict.fromkeys([0, len(seen) - 1]))
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 2.6))
        ax = fig.subplots()
        width = 0.8 / len(picks)
        for j, i in enumerate(picks):
            epoch, counts = seen[i]
            ax.bar([c + j * width for c in range(len(counts))], counts, width, label=f"epoch {epoch}")
        ax.set_xlabel("class")
        ax.set_ylabel("count")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=110)
        last = seen[-1][1]
        total = sum(last) or 1
        lines += [f"`{name}` (epoch {seen[-1][0]}: the most frequent class holds {100 * max(last) / total:.1f} %, "
                  f"{sum(1 for c in last if c)} of {len(last)} classes present; every epoch in metrics.jsonl):", "",
                  f"![{name}]({name}.png)", ""]
    return lines


def _monitor_line(summary: dict[str, Any], history: list[dict[str, Any]]) -> str:
    mon = summary["monitor"]
    name, label = mon["name"], metric_label(mon["name"])
    if mon["best"] is None:
        present = ", ".join(scalar_names(summary["metrics"])) or "none"
        return f"The monitor metric `{name}` is not among this run's metrics ({present}); no best epoch."
    better = "higher" if mon["mode"] == "max" else "lower"
    where = f"at epoch {mon['best_epoch']} of {len(history)}" if mon["best_epoch"] is not None else "(final)"
    final = summary["metrics"].get(name)
    return (f"Best {label}: **{fmt(mon['best'], name=name)}** {where} ({better} is better); "
            f"final {fmt(final, name=name)}.")


def _per_epoch_table(history: list[dict[str, Any]]) -> list[str]:
    """epoch, stage (when there are several), lr, every train_* term and every scalar val_* metric."""
    train_keys = list(dict.fromkeys(k for h in history for k in h if k.startswith("train_")))
    val_keys = list(dict.fromkeys(k for h in history for k, v in h.items()
                                  if k.startswith("val_") and not isinstance(v, list)))
    stages = list(dict.fromkeys(h.get("stage") for h in history if h.get("stage") is not None))
    header = ["epoch"] + (["stage"] if len(stages) > 1 else []) + ["lr"] + train_keys + val_keys
    decimals = {k: decimals_for([x for x in (to_number(h.get(k)) for h in history) if x is not None], k[4:])
                for k in train_keys + val_keys}
    rows = []
    for h in history:
        lr = to_number(h.get("lr"))
        row = [str(h.get("epoch", "-"))] + ([str(h.get("stage", "-"))] if len(stages) > 1 else [])
        row += ["-" if lr is None else f"{lr:.4g}"]
        row += [fmt(h.get(k), decimals[k], k[4:]) for k in train_keys + val_keys]
        rows.append(row)
    return _md_table(header, rows)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 100_000 else f"{n:,}"


def write_run_report(run_dir: str | Path, cfg: Any, result: Any, *, monitor: str = "top1", mode: str = "max",
                     evaluator: str = "classification") -> Path:
    """summary.json, curves.png and report.md in `run_dir`, for whatever metrics `evaluator` returned.

    `monitor` names the validation metric that says which epoch was best and `mode` whether higher
    ("max") or lower ("min") is better; both are recorded in summary.json under "monitor".
    """
    check_mode(mode)
    run_dir = Path(run_dir)
    history = epoch_history(run_dir, result)
    summary = summarize(cfg, result, history, monitor=monitor, mode=mode, evaluator=evaluator)
    if summary["monitor"]["best"] is None and summary["metrics"]:
        warnings.warn(f"{run_dir}: monitor metric {monitor!r} is not among the evaluator's metrics "
                      f"({', '.join(summary['metrics'])}); no best epoch recorded", stacklevel=2)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    plot = plot_curves(history, run_dir / "curves.png", monitor, mode)

    epochs = cfg.train.epochs
    teacher = summary["teacher"]
    lines = [f"# {cfg.name}", "",
             f"Method **{cfg.method.name}**, student `{cfg.student.name}`"
             + (f", teacher `{teacher}`" if teacher else "")
             + f", data `{cfg.data.name}`, {epochs} epoch{'s' if epochs != 1 else ''}, seed {cfg.seed}; "
             f"evaluator `{evaluator}`.", ""]
    lines += _model_table(summary) + [""]
    if teacher and summary["teacher_metrics"] is None:
        lines += [f"The teacher `{teacher}` was not evaluated in this run.", ""]
    lines += [_monitor_line(summary, history), ""]
    lines += _list_tables(summary)
    lines += _group_accuracy_charts(summary, run_dir)
    labels = {k: v for d in (summary["teacher_metrics"] or {}, summary["metrics"]) for k, v in d.items()
              if k in label_names(d)}
    lines += [f"{k}: `{v}`" for k, v in labels.items()] + ([""] if labels else [])
    if summary["cost"]:
        lines += ["Cost of one forward pass (torch FlopCounterMode): " + ", ".join(
            f"{k} {c['macs'] / 1e6:,.2f} M MACs, {_count(c['params'])} parameters"
            for k, c in summary["cost"].items()) + ".", ""]
    if summary["params"]:
        lines += ["Trained networks: " + ", ".join(f"{k} {_count(n)} parameters" for k, n in summary["params"].items())
                  + ".", ""]
    if summary["train_time_s"] or summary["stopped_early"]:  # a result without timed epochs has nothing to say
        lines += [f"Training time: {summary['train_time_s']:.1f} s"
                  + (" (stopped early by train.max_steps)" if summary["stopped_early"] else "") + ".", ""]
    if history:
        lines += ["## Per epoch", ""] + _per_epoch_table(history) + [""]
    if plot is not None:
        lines += ["![training curves](curves.png)", ""]
    lines += _epoch_samples(run_dir) + _epoch_histograms(history, run_dir)
    if (run_dir / "tsne.png").exists():
        lines += ["t-SNE of penultimate features, coloured by class and by group:", "", "![t-SNE](tsne.png)", ""]
    if (run_dir / "samples.png").exists():
        lines += ["A training batch as the student sees it:", "", "![training samples](samples.png)", ""]
    lines += ["The resolved configuration is in `config.yaml`; per-step and per-epoch metrics in `metrics.jsonl`; "
              "final metrics, best epoch and run identity in `summary.json`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
