"""What one-run reports and many-run tables share: number formatting, metric labels and modes, run identity."""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

# Pretty names for metrics the shipped evaluators return; any other name is shown as it is.
# The second field fixes the decimals (percentages: 2); None means "by magnitude".
METRIC_LABELS: dict[str, tuple[str, int | None]] = {
    "top1": ("top-1 (%)", 2),
    "top5": ("top-5 (%)", 2),
    "group_top1": ("per-group top-1 (%)", 2),
    "group_gap": ("group gap (points)", 2),
    "psnr": ("PSNR (dB)", 2),
    "ssim": ("SSIM", 4),
    "fid": ("FID", 2),
}
# Name parts of metrics where lower is better; everything else defaults to higher is better.
# Config keys that say how a run was executed or where it was written, not what was trained: two runs
# differing only in these are the same experiment (same identity, same table row).
RUN_ONLY_KEYS = frozenset({
    "name", "out_dir", "data.root", "data.eval_batch_size", "train.progress", "train.device",
    "train.tensorboard", "train.log_every", "train.checkpoint_every",
})
_SEED_SUFFIX = re.compile(r"[_-](?:s|seed)\d+$")


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, (name, None))[0]


def check_mode(mode: str) -> str:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return mode


def to_number(v: Any) -> float | None:
    """A metric value as a float: numbers, 'nan'/'inf' strings (as metrics.jsonl writes them); else None."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def decimals_for(values: list[float], name: str | None = None) -> int | None:
    """Decimals that show about four significant digits of the largest value (fixed for known metrics)."""
    fixed = METRIC_LABELS.get(name or "", ("", None))[1]
    if fixed is not None:
        return fixed
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    top = max(finite)
    if top >= 1000:
        return 1
    if top >= 10:
        return 2
    if top >= 1:
        return 3
    if top >= 1e-3:
        return 4
    return None  # tiny values: significant digits instead


def fmt(v: Any, decimals: int | None = None, name: str | None = None) -> str:
    """A table cell: '-' for missing, 'nan' for NaN, numbers to `decimals` (or by magnitude)."""
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int) and decimals is None:
        return str(v)
    x = to_number(v)
    if x is None:
        return str(v)
    if not math.isfinite(x):
        return str(x)
    if decimals is None:
        decimals = decimals_for([x], name)
    return f"{x:.3g}" if decimals is None else f"{x:.{decimals}f}"


def clean_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """JSON-safe metrics: numbers (0-d tensors and numpy scalars unwrapped), lists of them, NaN as 'nan', and
    labels (a string such as `fid_features`, naming the network FID was measured with)."""
    if metrics is None:
        return None

    def one(v: Any) -> Any:
        if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):  # tensors, numpy
            v = v.tolist()
        if isinstance(v, (list, tuple)):
            items = [one(x) for x in v]
            return items if all(x is not None for x in items) else None
        if isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)):
            return v if isinstance(v, int) or math.isfinite(v) else str(v)
        return None

    out = {k: one(v) for k, v in metrics.items()}
    return {k: v for k, v in out.items() if v is not None}


def scalar_names(metrics: dict[str, Any] | None) -> list[str]:
    return [k for k, v in (metrics or {}).items() if not isinstance(v, list) and to_number(v) is not None]


def label_names(metrics: dict[str, Any] | None) -> list[str]:
    """Metrics that are labels, not numbers ('nan' is a number)."""
    return [k for k, v in (metrics or {}).items() if isinstance(v, str) and to_number(v) is None]


def list_names(metrics: dict[str, Any] | None) -> list[str]:
    return [k for k, v in (metrics or {}).items() if isinstance(v, list)]


# ------------------------------------------------------------------------------------------- identity
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists are kept whole (compared as values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def method_uses_teacher(method: Any) -> bool:
    """Whether a method of this name uses a teacher it is given (not scratch, pix2pix, dcgan, flow_mle)."""
    from kdforge.registry import DISTILLERS, RegistryError

    try:
        return not DISTILLERS.get(str(method)).trains_alone
    except RegistryError:  # a run of a method this install does not have: keep its teacher as it is
        return True


def experiment_fields(config: dict[str, Any], *, with_seed: bool) -> dict[str, Any]:
    """The flattened config that defines what was trained (run-only keys dropped; seed kept or not)."""
    flat = flatten(config)
    # a teacher-free method (scratch, pix2pix, dcgan) ignores a teacher section: it does not make the run different
    unused_teacher = not method_uses_teacher(flat.get("method.name"))
    return {k: v for k, v in flat.items() if k not in RUN_ONLY_KEYS and (with_seed or k != "seed")
            and not (unused_teacher and (k == "teacher" or k.startswith("teacher.")))}


def config_hash(config: dict[str, Any], *, with_seed: bool = True) -> str:
    """A short stable hash of the experiment's config: with the seed it names one run, without it a group."""
    blob = json.dumps(experiment_fields(config, with_seed=with_seed), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def strip_seed(name: str) -> str:
    """'kd_resnet20_seed1' -> 'kd_resnet20'; 'kd_s0' -> 'kd'."""
    return _SEED_SUFFIX.sub("", name) or name
