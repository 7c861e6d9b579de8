"""Recipes: typed dataclasses read from flat YAML, with `--set a.b=c` overrides.

A recipe has five short sections (data, teacher, student, method, train) and a few top-level keys.
Unknown keys are rejected with the closest valid key, so a typo never silently becomes a default.
`method` and the model sections are open: their extra keys are keyword arguments of the distiller or of
the model factory, checked against that callable's signature when it is built.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from kdforge.registry import did_you_mean


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """A model by name (kdforge, `torchvision:x`, `timm:x`, `pkg.mod:factory`), its kwargs and weights."""

    name: str = "resnet20"
    weights: str | None = None  # checkpoint path: kdforge's, a plain state dict, or `module.`-prefixed
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "synthetic"  # a DATASETS name: synthetic, cifar10, cifar100, tiny_imagenet, image_folder
    source: str | None = None  # where the public files are (dir, .tar, .tar.gz); needed on first prepare
    root: str = "${KDFORGE_CACHE}/data"  # decoded-cache root, outside the repo (KDFORGE_CACHE: ~/.cache/kdforge)
    train_split: str = "train"
    val_split: str = "test"
    batch_size: int = 128
    eval_batch_size: int = 512
    crop_pad: int = 4  # random crop with this zero padding; 0 disables
    flip: bool = True
    resize: int | None = None  # resize every image to this side (e.g. 32 -> 224 for an ImageNet-shaped model)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    train_subset: int | None = None  # a fixed random subset (same for every seed) of the train split, for quick runs
    val_subset: int | None = None
    synthetic_train: int = 10000  # sizes of the generated dataset when name == synthetic
    synthetic_test: int = 2000
    synthetic_size: int = 32


@dataclass
class MethodConfig:
    name: str = "kd"  # a DISTILLERS name
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke runs)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine | multistep | constant | plateau
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: epochs, or fractions of the run when < 1
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, in epochs (fractions allowed)
    min_lr: float = 0.0
    plateau_patience: int = 10
    grad_clip: float | None = None  # max global grad norm
    precision: str = "32"  # 32 | bf16 | 16 (mixed, with a grad scaler on CUDA)
    channels_last: bool = False
    device: str = "auto"
    checkpoint_every: int | None = None  # steps; checkpoints are also written at every epoch end
    eval_every: int = 1  # epochs
    log_every: int = 50  # steps, for step lines in metrics.jsonl
    progress: bool = True
    tensorboard: bool = False
    teacher_cache: bool = False  # reuse teacher outputs by sample index (inputs must be deterministic)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _flatten_open(dataclasses.asdict(self))


# Sections whose unknown keys are kwargs of a callable rather than errors.
_OPEN = (ModelConfig, MethodConfig)


def _flatten_open(d: dict[str, Any]) -> dict[str, Any]:
    """Write `kwargs` back inline, so a saved config reads like the recipe it came from."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and "kwargs" in v and isinstance(v["kwargs"], dict):
            inner = {kk: vv for kk, vv in v.items() if kk != "kwargs"}
            inner.update(v["kwargs"])
            out[k] = inner
        elif isinstance(v, dict):
            out[k] = _flatten_open(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert YAML values to the annotated type, with an error naming the key."""
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if value is None:
        if typ is type(None) or type(None) in args:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    if type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, where) for v in value)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3`, without a dot, as a string
            value = _number_or_none(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return typ(value)
    if typ is str:
        return str(value)
    return value


def _number_or_none(text: str) -> Any:
    """'1e-3' -> 0.001 (finite numbers only); anything else is returned unchanged, to be rejected."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys fail with the closest valid key."""
    if data is None:
        data = {}
    if isinstance(data, str) and cls in _OPEN:  # `student: resnet20` is shorthand for {name: resnet20}
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in fields and key != "kwargs":
            kwargs[key] = _coerce(value, hints[key], path)
        elif key == "kwargs" and cls in _OPEN:  # an explicit `kwargs:` mapping, merged below
            _coerce(value, dict, path)
        elif cls in _OPEN:
            extra[key] = value
        else:
            valid = sorted(fields)
            raise ConfigError(f"unknown config key {path!r}{did_you_mean(str(key), valid)} (valid: {', '.join(valid)})")
    if cls in _OPEN:
        kwargs["kwargs"] = {**(data.get("kwargs") or {}), **extra}
    return cls(**kwargs)


def set_by_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating intermediate mappings."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif isinstance(child, str):  # shorthand `student: resnet20`
            child = node[k] = {"name": child}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.1' -> ('train.lr', 0.1); values are parsed as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a recipe (or start from `base`), apply `--set` overrides, and validate everything."""
    tree: dict[str, Any] = copy.deepcopy(dict(base or {}))  # overrides must not write into the caller's dict
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping at the top level")
        tree.update(loaded or {})
    for item in overrides:
        key, value = parse_override(item)
        set_by_path(tree, key, value)
    return from_dict(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def expand_path(p: str | None) -> str | None:
    """`~` and `$VARS` in recipe paths; `${KDFORGE_SHARED_DATA}` defaults to ../shared/data."""
    if p is None:
        return None
    # expandvars handles every variable that is set; only kdforge's two need a default when unset
    defaults = {"KDFORGE_SHARED_DATA": lambda: str(default_shared_data()), "KDFORGE_CACHE": lambda: "~/.cache/kdforge"}
    for name, default in defaults.items():
        if name not in os.environ:
            p = p.replace("${" + name + "}", default()).replace("$" + name, default())
    return os.path.expanduser(os.path.expandvars(p))


def default_shared_data() -> Path:
    env = os.environ.get("KDFORGE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str, also: Iterable[str] = ()) -> None:
    """Reject keyword arguments that `fn` does not take, naming them and the closest accepted one.

    `also` are other valid names the caller routes elsewhere (the API's training options), offered as
    suggestions too: `epoch=2` should point to `epochs` even though the method does not take it.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"unknown option {key!r} for {what}{did_you_mean(key, [*accepted, *also])}"
                              f" (accepted: {', '.join(accepted)})")
