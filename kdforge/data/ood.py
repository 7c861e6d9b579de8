"""Out-of-domain transfer sets: which samples of an unlabelled pool a frozen teacher should teach on.

MosaicKD (Fang et al., NeurIPS 2021, supplement Algorithm 1 "OOD subset selection") runs the teacher once
over the whole pool and keeps the k samples whose prediction p(y|x) has the highest entropy H(p(y|x)): the
images the teacher is least sure about, i.e. the least in-domain-looking ones (the official code keeps as
many as the in-domain train set has, 50k for CIFAR). Nayak et al. (WACV 2021, "Effectiveness of arbitrary
transfer sets for data-free knowledge distillation") found instead that arbitrary data transfers well when it
is *target-class balanced*: as many samples per class as the teacher assigns to it.

    probs = teacher_probabilities(teacher, loader)           # (N, C), dataset-index order
    entropy_subset(probs, k=50000)                           # Algorithm 1
    balanced_subset(probs, per_class=5000)                   # Nayak et al.
    select_ood_subset("tiny_imagenet", teacher, rule="entropy", k=5000, split="val")   # cached, see below

`select_ood_subset` works on a prepared pool (`kdforge prepare NAME ...`). It runs the teacher once per
(pool preparation, teacher weights, input normalisation) and keeps the probabilities in
`<root>/<pool>/ood/<key>/probs.pt`, so another rule or another k costs no teacher pass. The teacher id
(`teacher_fingerprint`, a hash of the state dict) is part of the key, so another teacher never reuses it.
Each selection is also written, as JSON with its rule, size, teacher id and pool fingerprint, to
`<key>/<rule>-<size>.json`. Files are written atomically. Recipes ask for a selection with
`data.train_select` (see kdforge.data.build.select_train), the CLI with `kdforge prepare ood-subset`.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import ConfigError, atomic_write_text
from kdforge.data.decoded import DecodedData
from kdforge.data.loader import IMAGENET_MEAN, IMAGENET_STD, BatchLoader
from kdforge.data.transforms import BatchAugment
from kdforge.registry import did_you_mean

#: rule name -> the size option it takes
RULES: dict[str, str] = {"entropy": "k", "balanced": "per_class"}
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ teacher pass
def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, the first element of a tuple/list, or a dict's 'logits'."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the teacher returned {type(out).__name__}; expected logits (a tensor, a tuple whose first "
                    "element is the logits, or a dict with 'logits')")


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def teacher_probabilities(teacher: nn.Module, loader: Any, device: str | torch.device = "cpu", *,
                          progress: bool = False) -> torch.Tensor:
    """softmax(teacher(x)) for every sample of `loader`, as float32 (N, C) rows in dataset-index order.

    `loader` yields kdforge batches (dicts with "image" and "index", e.g. a BatchLoader with shuffle=False,
    drop_last=False and no random augmentation) and must visit each index 0..N-1 exactly once. The teacher
    runs in eval mode without gradients; its mode and device are restored afterwards.
    """
    dev = _device(device)
    params = next(iter(teacher.parameters()), None)
    home, was_training = (params.device if params is not None else None), teacher.training
    teacher.eval().to(dev)
    rows: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="teacher pass", unit="batch", leave=False, dynamic_ncols=True)
    try:
        for batch in batches:
            if not isinstance(batch, Mapping) or "image" not in batch or "index" not in batch:
                raise TypeError("teacher_probabilities needs batches as dicts with 'image' and 'index' (a kdforge "
                                "BatchLoader gives them)")
            logits = _logits(teacher(batch["image"].to(dev, non_blocking=True)))
            rows.append(torch.softmax(logits.float(), dim=1).cpu())
            indices.append(torch.as_tensor(batch["index"]).long().cpu())
    finally:
        teacher.train(was_training)
        if home is not None:
            teacher.to(home)
    if not rows:
        raise ValueError("teacher_probabilities: the loader gave no batches")
    probs, index = torch.cat(rows), torch.cat(indices)
    n = len(index)
    if not torch.equal(torch.sort(index).values, torch.arange(n)):
        raise ValueError(f"teacher_probabilities: the loader's {n} samples are not each index 0..{n - 1} once "
                         "(use shuffle=False and drop_last=False, and no sampler)")
    out = torch.empty_like(probs)
    out[index] = probs
    return out


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short hash of the teacher's class and state dict (names, dtypes, shapes, bytes): equal weights give
    equal ids, so cached teacher outputs are reused only for the very same teacher."""
    h = hashlib.sha256(f"{type(teacher).__module__}.{type(teacher).__qualname__}\n".encode())
    for name, value in teacher.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(value.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ selection rules
def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0 or not probs.is_floating_point():
        raise ValueError(f"expected probabilities of shape (N, C) with N, C >= 1, got {tuple(probs.shape)} "
                         f"{probs.dtype}")
    if not torch.isfinite(probs).all():
        raise ValueError("the probabilities hold NaN or Inf values")
    return probs.detach().cpu()


def _count(value: Any, name: str) -> int:
    """A positive integer (an int, or a float or numpy scalar with an integral value)."""
    ok = not isinstance(value, bool) and (isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()))
    if not ok or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_c p_c log p_c per row (nats, 0 log 0 = 0), in float64."""
    return torch.special.entr(_check_probs(probs).double()).sum(dim=1)


def entropy_subset(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` rows of `probs` with the highest entropy H(p(y|x)), sorted ascending.

    MosaicKD's supplement, Algorithm 1 (lines 2-8: h_i = H(p(y|x_i)); index = topk-index(H)). Equal entropies
    are broken by index, the lower first, so the result is deterministic. k > N is an error naming both.
    """
    probs = _check_probs(probs)
    n = probs.shape[0]
    k = _count(k, "k")
    if k > n:
        raise ValueError(f"k={k} is more than the pool's {n} samples")
    order = torch.sort(entropy(probs), descending=True, stable=True).indices  # stable: ties keep index order
    return torch.sort(order[:k]).values


def balanced_subset(probs: torch.Tensor, per_class: int) -> torch.Tensor:
    """A target-class-balanced transfer set (Nayak et al. 2021): `per_class` samples for each of the C classes,
    C * per_class indices in all, sorted ascending.

    For each class c: the samples the teacher assigns to c (argmax p(y|x) = c, the first maximum on ties) with
    the highest p(c|x). The ranking by p(c|x) within a class is kdforge's reading of "balanced by the
    teacher's predictions". Ours, not the paper's: when fewer than `per_class` samples have argmax c, the
    class is filled with the not yet chosen samples of highest p(c|x), after every class has taken its own
    (classes filled in order 0..C-1), so the set stays balanced in size and no sample appears twice. Ties in
    p(c|x) are broken by index, the lower first.
    """
    probs = _check_probs(probs)
    n, c = probs.shape
    per_class = _count(per_class, "per_class")
    if per_class * c > n:
        raise ValueError(f"per_class={per_class} x {c} classes = {per_class * c} samples is more than the pool's {n}")
    pred = probs.argmax(dim=1)
    chosen = torch.zeros(n, dtype=torch.bool)

    def best(candidates: torch.Tensor, cls: int, count: int) -> torch.Tensor:
        order = torch.sort(probs[candidates, cls], descending=True, stable=True).indices
        return candidates[order[:count]]

    missing: list[tuple[int, int]] = []
    for cls in range(c):
        take = best(torch.nonzero(pred == cls).squeeze(1), cls, per_class)
        chosen[take] = True
        if len(take) < per_class:
            missing.append((cls, per_class - len(take)))
    for cls, count in missing:
        chosen[best(torch.nonzero(~chosen).squeeze(1), cls, count)] = True
    return torch.nonzero(chosen).squeeze(1)


def check_selection(spec: Any, where: str = "data.train_select") -> dict[str, Any]:
    """Validate a selection spec (`{rule: entropy, k: 50000}` or `{rule: balanced, per_class: 5000}`) and
    return it normalised; errors name the key and list the allowed rules."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{rule: entropy, k: 50000}}, got {spec!r}")
    rule = spec.get("rule")
    if not isinstance(rule, str) or rule.lower() not in RULES:
        raise ConfigError(f"{where}.rule: unknown rule {rule!r}{did_you_mean(str(rule).lower(), list(RULES))} "
                          f"(one of: {', '.join(f'{r} (with {s})' for r, s in RULES.items())})")
    rule = rule.lower()
    size_key = RULES[rule]
    allowed = ["rule", size_key]
    for key in spec:
        if key not in allowed:
            owner = [r for r, s in RULES.items() if s == key]
            hint = f"; {key} goes with rule {owner[0]}" if owner else did_you_mean(str(key), allowed)
            raise ConfigError(f"{where}: unknown key {key!r} for rule {rule!r}{hint} (valid: {', '.join(allowed)})")
    if size_key not in spec:
        raise ConfigError(f"{where}: rule {rule!r} needs {size_key} (e.g. {{rule: {rule}, {size_key}: 5000}})")
    try:
        size = _count(spec[size_key], f"{where}.{size_key}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"rule": rule, size_key: size}


def apply_rule(probs: torch.Tensor, rule: str, size: int) -> torch.Tensor:
    """`entropy_subset(probs, size)` or `balanced_subset(probs, size)`, by rule name."""
    spec = check_selection({"rule": rule, RULES.get(str(rule).lower(), "k"): size}, "selection")
    fn = entropy_subset if spec["rule"] == "entropy" else balanced_subset
    return fn(probs, spec[RULES[spec["rule"]]])


# ------------------------------------------------------------------------------------------ the cache
def pool_fingerprint(pool_name: str, split: str = "train", root: str | Path | None = None) -> str:
    """A hash naming one committed preparation of a pool and one of its splits (the generation, builder,
    options and source fingerprint of its `prepared.json`): a new preparation gives a new fingerprint."""
    from kdforge.data.prepare import _root, committed_preparation

    stamp = committed_preparation(pool_name, root)
    if stamp is None:
        raise FileNotFoundError(f"no prepared pool {pool_name!r} at {_root(root) / pool_name}; run "
                                f"`kdforge prepare {pool_name} --source PATH` first")
    if split not in stamp["splits"]:
        raise FileNotFoundError(f"pool {pool_name!r} has no split {split!r}{did_you_mean(split, stamp['splits'])} "
                                f"(prepared splits: {', '.join(stamp['splits'])})")
    key = {"name": pool_name, "split": split,
           **{k: stamp.get(k) for k in ("generation", "format", "options", "format_version", "fingerprint")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _view(mean: Sequence[float], std: Sequence[float], resize: int | None) -> dict[str, Any]:
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "resize": None if resize is None else int(resize)}


def _load_probs(path: Path, n: int) -> torch.Tensor | None:
    from kdforge.engine.checkpoint import read_torch_file

    if not path.is_file():
        return None
    try:
        probs = read_torch_file(path, "cached teacher probabilities")["probs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or foreign: computed again and replaced
    return probs if isinstance(probs, torch.Tensor) and probs.ndim == 2 and len(probs) == n else None


def _remove_stale(folder: Path, key: dict[str, Any], keep: str) -> None:
    """Entries of this pool and split made from an earlier preparation: their data is gone for good."""
    for entry in folder.iterdir():
        if entry.name == keep or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            other = json.loads((entry / "key.json").read_text())
        except (OSError, ValueError):
            continue
        if other.get("split") == key["split"] and other.get("pool_fingerprint") != key["pool_fingerprint"]:
            shutil.rmtree(entry, ignore_errors=True)


def select_ood_subset(
    pool_name: str,
    teacher: nn.Module,
    teacher_id: str | None = None,
    rule: str = "entropy",
    k: int | None = None,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    per_class: int | None = None,
    split: str = "train",
    batch_size: int = 512,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """The indices (sorted, into split `split` of the prepared pool `pool_name`) that `rule` keeps.

    rule "entropy" keeps the `k` highest-entropy samples (MosaicKD, Algorithm 1); "balanced" keeps `per_class`
    samples per teacher class (Nayak et al.). The teacher sees the images as training will: normalised with
    `mean`/`std` and resized to `resize` (the recipe's data.mean, data.std, data.resize). Its probabilities are
    cached per (pool preparation, `teacher_id`, normalisation) under `<root>/<pool_name>/ood/` (root: the
    decoded-data root, default `$KDFORGE_CACHE/data`); `teacher_id` defaults to `teacher_fingerprint(teacher)`,
    the hash of its weights. The selection is saved beside them as JSON. `progress` receives one-line messages
    (and turns on a progress bar for the teacher pass).
    """
    from kdforge.data.prepare import _root, load_split

    spec = check_selection({"rule": rule, **({"k": k} if k is not None else {}),
                            **({"per_class": per_class} if per_class is not None else {})}, "selection")
    size_key = RULES[spec["rule"]]
    tid = teacher_id if teacher_id is not None else teacher_fingerprint(teacher)
    data = load_split(pool_name, split, root)
    key = {"version": _CACHE_VERSION, "pool": pool_name, "split": split,
           "pool_fingerprint": pool_fingerprint(pool_name, split, root), "teacher_id": tid,
           "view": _view(mean, std, resize)}
    folder = _root(root) / pool_name / "ood"
    entry = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    probs = _probabilities(data, teacher, folder / entry, key, device=device, batch_size=batch_size, mean=mean,
                           std=std, resize=resize, progress=progress)
    _remove_stale(folder, key, keep=entry)
    indices = apply_rule(probs, spec["rule"], spec[size_key])
    out = folder / entry / f"{spec['rule']}-{size_key}{spec[size_key]}.json"
    record = {"rule": spec["rule"], size_key: spec[size_key], "teacher_id": tid, "pool": pool_name, "split": split,
              "pool_fingerprint": key["pool_fingerprint"], "view": key["view"], "pool_size": len(data),
              "num_classes": int(probs.shape[1]), "selected": len(indices), "indices": indices.tolist()}
    atomic_write_text(out, json.dumps(record))
    if progress:
        progress(f"{pool_name} ({split}): {spec['rule']} selection of {len(indices)} of {len(data)} samples -> {out}")
    return indices


def _probabilities(data: DecodedData, teacher: nn.Module, entry: Path | None, key: dict[str, Any], *,
                   device: str | torch.device, batch_size: int, mean: Sequence[float], std: Sequence[float],
                   resize: int | None, progress: Callable[[str], None] | None) -> torch.Tensor:
    """The teacher's probabilities over `data`: read from `entry/probs.pt` when it holds them, else computed
    (and written there, with key.json saying what they are of, unless `entry` is None)."""
    from kdforge.engine.checkpoint import atomic_save

    path = entry / "probs.pt" if entry is not None else None
    probs = _load_probs(path, len(data)) if path is not None else None
    if probs is not None:
        if progress:
            progress(f"{key.get('pool', data.name)}: reusing teacher probabilities {path}")
        return probs
    if progress:
        progress(f"{key.get('pool', data.name)}: running the teacher over {len(data)} samples ...")
    loader = BatchLoader(data, batch_size, shuffle=False, drop_last=False, augment=BatchAugment(resize=resize),
                         mean=mean, std=std)
    probs = teacher_probabilities(teacher, loader, device, progress=progress is not None)
    if path is not None:
        entry.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry / "key.json", json.dumps(key, indent=1))
        atomic_save({"probs": probs, "key": json.dumps(key)}, path)
    return probs


def select_from_data(data: DecodedData, teacher: nn.Module, spec: Mapping[str, Any], *,
                     device: str | torch.device = "cpu", batch_size: int = 512,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     resize: int | None = None, progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """The selection `spec` over in-memory data (a generated dataset, no preparation to key a cache by):
    the teacher runs every time and nothing is written."""
    spec = check_selection(spec, "selection")
    probs = _probabilities(data, teacher, None, {"pool": data.name}, device=device, batch_size=batch_size,
                           mean=mean, std=std, resize=resize, progress=progress)
    return apply_rule(probs, spec["rule"], spec[RULES[spec["rule"]]])
