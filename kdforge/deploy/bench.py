"""Distilled students and their teachers side by side, as deployed: one row per model with its size, its
compute, its ONNX file, its latency (eager PyTorch and ONNX Runtime on the CPU, eager on the GPU where there is
one) and the score its run is judged by, on one test set; a Markdown table and a plot of score against latency.

    result = kdforge.bench(["runs/kd_resnet20"], "recipes/kd/cifar10/resnet20_from_resnet56.yaml",
                           teachers=["resnet56=../shared/data/cifar10-resnets/resnet56-4bfd9763.th"],
                           threads=1, out="results/deploy.md")

Every latency comes from kdforge.deploy.latency at one thread count for all backends, so ratios compare.
"""
from __future__ import annotations

import contextlib
import platform
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import RunConfig
from kdforge.deploy._optional import require
from kdforge.deploy.diagnose import ExportError
from kdforge.deploy.export import ExportResult, export
from kdforge.deploy.latency import Latency, eager_backend, measure, onnxruntime_backend, ratio
from kdforge.deploy.parity import with_batch
from kdforge.deploy.sources import Source, data_config, eval_loader, example_input, load_source, pretrained_source
from kdforge.models.cost import count_macs as macs_of

EAGER, ORT, GPU = "eager-cpu", "onnxruntime-cpu", "eager-cuda"
CALIBRATION_IMAGES = 256  # int8: training images that set the activation ranges


@dataclass
class BenchRow:
    label: str
    kind: str  # run | checkpoint | pretrained | module | int8
    params: int
    macs: int | None  # multiply-accumulates of one image: FLOPs / 2 (FlopCounterMode)
    onnx_bytes: int | None
    latency: dict[str, Latency] = field(default_factory=dict)  # "eager-cpu@1", "onnxruntime-cpu@64", ...
    metric: str | None = None  # the evaluator's main metric (its monitor), e.g. top1
    value: float | None = None
    export: ExportResult | None = None
    note: str = ""

    def get(self, backend: str, batch: int) -> Latency | None:
        return self.latency.get(f"{backend}@{batch}")

    @property
    def ort_over_eager(self) -> float | None:
        """ONNX Runtime's time per image over eager PyTorch's, at batch 1 (< 1: ORT is faster)."""
        a, b = self.get(ORT, 1), self.get(EAGER, 1)
        return ratio(a, b) if a and b else None


@dataclass
class BenchResult:
    rows: list[BenchRow]
    threads: int
    table: str  # the Markdown report: table and notes
    path: Path | None = None  # where the table was written
    plot: Path | None = None
    data: str = ""  # what the models were scored on


def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """kdforge.models.cost.count_macs (FlopCounterMode's FLOPs halved: convolutions and matrix products, not
    elementwise ops), or None when the model cannot be counted: a bench row shows "-" rather than failing."""
    try:
        return macs_of(model, *inputs)
    except Exception:
        return None


def _sources(entries: Sequence[Any], network: str) -> list[Source]:
    out = []
    for e in entries:
        if isinstance(e, Source):
            out.append(e)
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], nn.Module):
            out.append(Source(str(e[0]), e[1], "module"))
        elif isinstance(e, (str, Path)):
            out.append(load_source(e, network=network))
        else:
            raise TypeError(f"bench entries are run folders, checkpoints or (label, nn.Module) pairs; got "
                            f"{type(e).__name__}")
    return out


def _calibration(cfg: RunConfig | None, example: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """int8 calibration batches: training images for a model of one image input (the test images are what it
    is scored on), else the example itself (latent codes for a generator)."""
    if cfg is None or len(example) != 1 or example[0].dim() != 4:
        return [example]
    from kdforge.data.build import build_loaders

    batches, n = [], 0
    for b in build_loaders(cfg.data, seed=cfg.seed).train:
        if tuple(b["image"].shape[1:]) != tuple(example[0].shape[1:]):
            return [example]
        batches.append((b["image"],))
        n += len(b["image"])
        if n >= CALIBRATION_IMAGES:
            break
    return batches or [example]


class Bench:
    """The measurements of one `bench` call; see `bench` for the arguments."""

    def __init__(self, *, threads: int, warmup: int, repeats: int, batch_size: int, gpu: bool, workdir: Path,
                 loader: Any, evaluator: Any, progress: Callable[[str], None] | None) -> None:
        self.threads, self.warmup, self.repeats, self.batch_size = threads, warmup, repeats, batch_size
        self.gpu, self.workdir, self.loader, self.evaluator = gpu, workdir, loader, evaluator
        self.progress = progress or (lambda _: None)

    def timings(self, row: BenchRow, backend: Any, example: tuple[torch.Tensor, ...]) -> None:
        for b in (1, self.batch_size):
            lat = measure(backend, example, batch_size=b, threads=self.threads, warmup=self.warmup,
                          repeats=self.repeats)
            row.latency[f"{backend.name}@{b}"] = lat
            self.progress(f"  {lat}")

    def score(self, model: nn.Module, network: str = "student") -> tuple[str | None, float | None, str]:
        if self.loader is None or self.evaluator is None:
            return None, None, ""
        if network != "student":  # a generator or a critic: the run's evaluator scores its student
            return None, None, f"the {network}: not scored"
        from kdforge.api import evaluate

        try:
            metrics = evaluate(model, self.loader, evaluator=self.evaluator, device="cpu")
        except (RuntimeError, ValueError, TypeError) as e:
            return None, None, f"not scored: {str(e).splitlines()[0][:120]}"
        monitor = self.evaluator.monitor
        value = metrics.get(monitor)
        return monitor, (float(value) if isinstance(value, (int, float)) else None), ""

    def row(self, src: Source, example: tuple[torch.Tensor, ...]) -> BenchRow:
        model = src.model.cpu().eval()
        self.progress(f"bench: {src.label}")
        one = with_batch(example, 1)
        row = BenchRow(src.label, src.kind, sum(p.numel() for p in model.parameters()), count_macs(model, one), None)
        try:
            row.export = export(model, example, self.workdir / f"{_slug(src.label)}.onnx", dynamic_batch=True)
            row.onnx_bytes = row.export.size_bytes
            if not row.export.passed:
                row.note = f"ONNX outputs differ from eager ({row.export.detail})"
        except ExportError as e:
            row.note = f"no ONNX file: {e}"
        self.timings(row, eager_backend(model), example)
        if row.export is not None:
            self.timings(row, onnxruntime_backend(row.export.path), example)
        if self.gpu:
            import copy

            self.timings(row, eager_backend(copy.deepcopy(model), "cuda"), example)
        row.metric, row.value, note = self.score(model, src.network)
        row.note = "; ".join(n for n in (row.note, note) if n)
        return row

    def int8_row(self, base: BenchRow, example: tuple[torch.Tensor, ...],
                 calibration: list[tuple[torch.Tensor, ...]]) -> BenchRow | None:
        from kdforge.deploy.quantize import quantize_int8
        from kdforge.deploy.runtime import OrtModule

        if base.export is None:
            return None
        self.progress(f"bench: {base.label} int8")
        path = quantize_int8(base.export.path, base.export.path.with_name(base.export.path.stem + ".int8.onnx"),
                             calibration)
        row = BenchRow(f"{base.label} (int8)", "int8", base.params, base.macs, path.stat().st_size)
        self.timings(row, onnxruntime_backend(path), example)
        row.metric, row.value, row.note = self.score(OrtModule(path, threads=self.threads))
        row.note = "; ".join(n for n in ("static int8 (QDQ, per-channel weights)", row.note) if n)
        return row


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def bench(entries: Sequence[Any], data: str | Path | RunConfig | None = None, *, teachers: Sequence[str] = (),
          threads: int = 1, out: str | Path | None = None, int8: bool = False, network: str = "student",
          warmup: int = 3, repeats: int = 20, batch_size: int = 64, input_shape: str | tuple[int, ...] | None = None,
          gpu: bool | None = None, plot: bool = True,
          progress: Callable[[str], None] | None = None) -> BenchResult:
    """One row per model: parameters, MACs, ONNX file size, latency at batch 1 (median ± spread, ms/image) and
    throughput at `batch_size` (images/s) for eager PyTorch and ONNX Runtime on the CPU with `threads` threads
    (and eager CUDA when `gpu`, default: when available), the evaluator's main metric on the test split, and
    ONNX Runtime's time over eager's.

    `entries`: run folders, checkpoints, or (label, nn.Module) pairs; `teachers`: NAME=WEIGHTS pretrained
    models. `data`: a recipe, a dataset name or a RunConfig whose data and eval sections every model is scored
    with (default: the first run's own). `int8` adds an ONNX Runtime int8 row per model (static quantisation
    calibrated on training images). With `out`, the table is written there, the plot beside it (.png) and
    the ONNX files in `<out stem>_onnx/`.
    """
    sources = _sources(entries, network)
    fallback = next((s.config for s in sources if s.config is not None), None)
    cfg = data_config(data, fallback)
    loader, evaluator, num_classes = None, None, None
    if cfg is not None:
        from kdforge.recipe import _evaluator

        loader, num_classes = eval_loader(cfg)
        evaluator = _evaluator(cfg)[0]
    sources += [pretrained_source(t, num_classes) for t in teachers]
    if not sources:
        raise ValueError("nothing to bench: give run folders, checkpoints or --teacher NAME=WEIGHTS")
    gpu = torch.cuda.is_available() if gpu is None else gpu
    out = Path(out) if out is not None else None
    with contextlib.ExitStack() as stack:
        if out is not None:
            workdir = out.parent / f"{out.stem}_onnx"
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdforge-bench-")))
        runner = Bench(threads=threads, warmup=warmup, repeats=repeats, batch_size=batch_size, gpu=gpu,
                       workdir=workdir, loader=loader, evaluator=evaluator, progress=progress)
        rows = []
        for src in sources:
            example, _ = example_input(src.model, cfg, n=batch_size, input_shape=input_shape)
            rows.append(runner.row(src, example))
            if int8:
                extra = runner.int8_row(rows[-1], example, _calibration(cfg, example))
                rows += [extra] if extra else []
        described = (f"{cfg.data.name} ({cfg.data.val_split} split), evaluator {cfg.eval.name}" if cfg is not None
                     else "no data: models not scored")
        table = format_table(rows, threads=threads, warmup=warmup, repeats=repeats, batch_size=batch_size,
                             gpu=gpu, data=described)
        result = BenchResult(rows, threads, table, data=described)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
            result.path = out
            if plot:
                result.plot = plot_accuracy_latency(rows, out.with_suffix(".png"))
    return result


# ------------------------------------------------------------------------------------------------ report
def _count(n: int | None, unit: str = "") -> str:
    if n is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n} {unit}".strip()


def _ms(lat: Latency | None) -> str:
    return f"{lat.per_image_ms:.3f} ± {lat.per_image_spread_ms:.3f}" if lat else "—"


def _ips(lat: Latency | None) -> str:
    return f"{lat.images_per_s:,.0f}" if lat else "—"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows: Sequence[BenchRow], *, threads: int, warmup: int, repeats: int, batch_size: int, gpu: bool,
                 data: str) -> str:
    """The Markdown report of a bench: the table, then what each number is and how it was measured."""
    from kdforge.report.common import fmt, metric_label

    metric = next((r.metric for r in rows if r.metric), None)
    header = ["model", "params", "MACs", "ONNX", "eager CPU b1 (ms/img)", f"eager CPU b{batch_size} (img/s)",
              "ORT CPU b1 (ms/img)", f"ORT CPU b{batch_size} (img/s)"]
    if gpu:
        header += ["GPU b1 (ms/img)", f"GPU b{batch_size} (img/s)"]
    header += [metric_label(metric) if metric else "score", "ORT / eager (b1)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r.label, _count(r.params), _count(r.macs), _count(r.onnx_bytes, "B"), _ms(r.get(EAGER, 1)),
                 _ips(r.get(EAGER, batch_size)), _ms(r.get(ORT, 1)), _ips(r.get(ORT, batch_size))]
        if gpu:
            cells += [_ms(r.get(GPU, 1)), _ips(r.get(GPU, batch_size))]
        q = r.ort_over_eager
        cells += [fmt(r.value, name=r.metric) if r.value is not None else "—", f"{q:.2f}x" if q else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    ort_version = require("onnxruntime", "kdforge bench").__version__
    lines += [
        "",
        f"Scored on {data}. Latency: median ± half the interquartile range of {repeats} timed calls after {warmup} "
        f"warm-up calls, per image, at batch 1; throughput from the median time of a batch of {batch_size}. "
        f"{threads} thread(s) for every CPU backend (torch.set_num_threads; ONNX Runtime intra_op_num_threads, "
        f"sequential), on {_cpu_name()}; torch {torch.__version__}, onnxruntime {ort_version}"
        + (f", GPU {torch.cuda.get_device_name(0)} (synchronised per call)" if gpu else "") + ".",
        "MACs: FLOPs of one image counted by torch.utils.flop_counter.FlopCounterMode, halved (a multiply-add is "
        "two FLOPs); convolutions and matrix products only. ONNX: the file's size (float32 weights; int8 rows: "
        "the quantised file). ORT / eager: ONNX Runtime's time per image over eager PyTorch's at batch 1 (below "
        "1: ONNX Runtime is faster).",
    ]
    checked = [r for r in rows if r.export is not None]
    if checked:
        lines += ["", "ONNX parity with eager (batch sizes 1, 7 and the example's):"]
        lines += [f"- {r.label}: {r.export.exporter} exporter, max |diff| {r.export.max_abs_diff:.1e} "
                  f"(tolerance {r.export.tolerance:.1e}): {'match' if r.export.passed else 'DIFFER'}"
                  for r in checked]
    notes = [f"- {r.label}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plot_accuracy_latency(rows: Iterable[BenchRow], path: Path) -> Path | None:
    """Score against CPU latency per image at batch 1: eager (filled) and ONNX Runtime (hollow), joined per
    model. None when no row has a score."""
    rows = [r for r in rows if r.value is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdforge.report.common import metric_label

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(rows):
        colour = f"C{i % 10}"
        points = [(lat.per_image_ms, marker) for lat, marker in ((r.get(EAGER, 1), "o"), (r.get(ORT, 1), "s"))
                  if lat is not None]
        if len(points) == 2:
            ax.plot([p[0] for p in points], [r.value] * 2, color=colour, lw=1, alpha=0.6)
        for x, marker in points:
            ax.scatter([x], [r.value], marker=marker, color=colour if marker == "o" else "white",
                       edgecolors=colour, s=50, zorder=3)
        if points:
            ax.annotate(r.label, (points[0][0], r.value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency at batch 1 (ms / image; ● eager PyTorch, □ ONNX Runtime)")
    ax.set_ylabel(metric_label(rows[0].metric or "score"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
