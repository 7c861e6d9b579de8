"""Recipes: typed dataclasses read from flat YAML, with `--set a.b=c` overrides.

A recipe has short sections (data, teacher, student, method, train, and optionally eval) and a few top-level
keys.
Unknown keys are rejected with the closest valid key, so a typo never silently becomes a default.
`method` and the model sections are open: their extra keys are keyword arguments of the distiller or of
the model factory, checked against that callable's signature when it is built.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
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
    train_name: str | None = None  # train on another dataset (out-of-domain data); `name` is then only evaluated
    train_source: str | None = None  # where train_name's public files are
    # no training data (DAFL, DFAD: the method makes its inputs): the train loader is kdforge.data.DataFree with
    # this many steps an epoch of batch_size; `name` is only evaluated
    data_free_steps: int | None = None
    # keep the teacher-chosen part of the train split: {rule: entropy, k: N} (MosaicKD's OOD subset) or
    # {rule: balanced, per_class: N} (Nayak et al.); applied before train_subset; see kdforge.data.ood
    train_select: dict[str, Any] | None = None
    train_options: dict[str, Any] = field(default_factory=dict)  # train_name's builder options (e.g. size: 32)
    options: dict[str, Any] = field(default_factory=dict)  # the dataset builder's (cifar10s: skew; utkface: size)
    sampler: str | None = None  # group_class_balanced: every (group, class) cell equally in every batch (SS)
    train_subset: int | None = None  # a fixed random subset (same for every seed) of the train split, for quick runs
    val_subset: int | None = None
    synthetic_train: int = 10000  # sizes of the generated dataset when name == synthetic
    synthetic_test: int = 2000
    synthetic_size: int = 32
    # keep the decoded splits on this device (e.g. cuda) and build every batch there (crop, flip, normalise):
    # CIFAR-size data fits on any GPU, and the input pipeline then never waits on the CPU
    device: str | None = None

    def __post_init__(self) -> None:
        _validate_data(self)


@dataclass
class MethodConfig:
    name: str = "kd"  # a DISTILLERS name
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """What a run is scored by: an EVALUATORS name (classification, groups, images) and its options."""

    name: str = "classification"
    monitor: str | None = None  # the metric for "best" and the plateau schedule; default: the evaluator's own
    mode: str | None = None  # max | min (higher or lower is better); default: the evaluator's own
    tsne: int = 0  # > 0: a t-SNE plot (tsne.png) of this many val samples' penultimate student features
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
    sync_batchnorm: bool = False  # data parallel on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)
    compile: bool = False  # torch.compile the teacher and the method's networks in place (names and keys unchanged)
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead | max-autotune | ...

    def __post_init__(self) -> None:  # also for TrainConfig(...) and distill(..., epochs=0) from Python
        _validate_train(self)


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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate_run_name(self.name)
        _number(self, "", "seed", integer=True)

    def to_dict(self) -> dict[str, Any]:
        return _flatten_open(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------------- ranges
# Checked when a config is built (from a recipe or from Python), so a bad value fails at load, naming
# the key and the allowed range, instead of deep inside a run (or, worse, silently: a negative
# grad_clip turns gradient descent into ascent).
PRECISIONS = ("32", "fp32", "bf16", "16", "fp16")
OPTIMIZERS = ("sgd", "adam", "adamw")  # what kdforge.engine.optim builds
SCHEDULES = ("cosine", "multistep", "constant", "plateau")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def validate_run_name(name: Any) -> str:
    """`name` must be a plain folder name: the run folder is <out_dir>/<name>, and --overwrite replaces it."""
    if (not isinstance(name, str) or name.strip() in ("", ".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ConfigError(f"name: {name!r} is not a plain folder name (no '/', not '.' or '..', not empty); "
                          f"the run folder is <out_dir>/<name>, so put directories in out_dir")
    return name


def _rule(integer: bool, low: float | None, above: bool, high: float | None, optional: bool) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        rng = f" in [{low}, {high}]" if not above else f" in ({low}, {high}]"
    elif low is not None:
        rng = f" {'>' if above else '>='} {low}"
    elif high is not None:
        rng = f" <= {high}"
    else:
        rng = ""
    return kind + rng + (" or null" if optional else "")


def _number(obj: Any, section: str, key: str, *, integer: bool = False, low: float | None = None,
            above: bool = False, high: float | None = None, optional: bool = False, why: str = "") -> None:
    """Check a numeric setting's range, and store it as a plain int/float (numpy scalars dump badly to YAML)."""
    value = getattr(obj, key)
    if value is None and optional:
        return
    where = f"{section}.{key}" if section else key
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if above else value >= low)) and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{where}: must be {_rule(integer, low, above, high, optional)}, got {value!r}{why}")
    setattr(obj, key, int(value) if integer else float(value))


def _choice(obj: Any, section: str, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if str(value).lower() not in choices:
        raise ConfigError(f"{section}.{key}: unknown {key} {value!r}{did_you_mean(str(value).lower(), choices)}"
                          f" (one of: {', '.join(choices)})")


def _flag(obj: Any, section: str, key: str) -> None:
    value = getattr(obj, key)
    if value not in (True, False):  # also admits numpy bools and 0/1
        raise ConfigError(f"{section}.{key}: expected true/false, got {value!r}")
    setattr(obj, key, bool(value))


def _numbers(obj: Any, section: str, key: str, *, low: float | None = None, above: bool = False,
             high: float | None = None, below_high: bool = False, length: int | None = None) -> None:
    """A tuple setting (mean, std, betas, milestones): each element a finite number in range."""
    values = getattr(obj, key)
    where = f"{section}.{key}"
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of numbers, got {values!r}")
    if length is not None and len(values) != length:
        raise ConfigError(f"{where}: expected {length} numbers, got {len(values)} ({list(values)!r})")
    for v in values:
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
        ok = ok and (low is None or (v > low if above else v >= low))
        ok = ok and (high is None or (v < high if below_high else v <= high))
        if not ok:
            rng = " ".join(filter(None, [f"{'>' if above else '>='} {low}" if low is not None else "",
                                         "and" if low is not None and high is not None else "",
                                         f"{'<' if below_high else '<='} {high}" if high is not None else ""]))
            raise ConfigError(f"{where}: every value must be a number{' ' + rng if rng else ''}, got {v!r}")
    setattr(obj, key, tuple(float(v) for v in values))


def _text(obj: Any, section: str, key: str, *, optional: bool = False) -> None:
    value = getattr(obj, key)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{section}.{key}: must be a non-empty string, got {value!r}")


def _validate_train(c: TrainConfig) -> None:
    s = "train"
    _number(c, s, "epochs", integer=True, low=1)
    _number(c, s, "max_steps", integer=True, low=1, optional=True)
    _choice(c, s, "optimizer", OPTIMIZERS)
    _number(c, s, "lr", low=0, above=True)
    _number(c, s, "momentum", low=0, high=1)
    _flag(c, s, "nesterov")
    if c.nesterov and c.momentum == 0 and str(c.optimizer).lower() == "sgd":
        raise ConfigError("train.nesterov: Nesterov momentum needs train.momentum > 0")
    _number(c, s, "weight_decay", low=0)
    _numbers(c, s, "betas", low=0, high=1, below_high=True, length=2)
    _choice(c, s, "schedule", SCHEDULES)
    _numbers(c, s, "milestones", low=0)
    _number(c, s, "gamma", low=0, above=True)
    _number(c, s, "warmup_epochs", low=0)
    _number(c, s, "min_lr", low=0)
    _number(c, s, "plateau_patience", integer=True, low=0)
    _number(c, s, "grad_clip", low=0, above=True, optional=True,
            why=" (a max gradient norm; a negative one would turn descent into ascent)")
    c.precision = str(c.precision)  # `precision: 32` in YAML or precision=16 from Python
    _choice(c, s, "precision", PRECISIONS)
    _flag(c, s, "channels_last")
    _device(c.device)
    _number(c, s, "checkpoint_every", integer=True, low=1, optional=True)
    _number(c, s, "eval_every", integer=True, low=1)
    _number(c, s, "log_every", integer=True, low=0, why=" (0: no step lines)")
    for key in ("progress", "tensorboard", "teacher_cache", "compile"):
        _flag(c, s, key)
    _choice(c, s, "compile_mode", COMPILE_MODES)


def _device(name: Any, key: str = "train.device") -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}: must be auto or a torch device such as cpu, cuda, cuda:1, got {name!r}")
    if name == "auto":
        return
    import torch  # only here: parsing a device name needs no GPU, but config.py stays light otherwise

    try:
        torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{key}: unknown device {name!r} (use auto, cpu, cuda, cuda:N, mps, ...)") from e


def _validate_data(c: DataConfig) -> None:
    s = "data"
    for key in ("name", "root", "train_split", "val_split"):
        _text(c, s, key)
    _number(c, s, "batch_size", integer=True, low=1)
    _number(c, s, "eval_batch_size", integer=True, low=1)
    if c.device is not None:
        _device(c.device, "data.device")
    _number(c, s, "crop_pad", integer=True, low=0, why=" (0: no random crop)")
    _flag(c, s, "flip")
    _number(c, s, "resize", integer=True, low=1, optional=True)
    _numbers(c, s, "mean")
    _numbers(c, s, "std", low=0, above=True)
    if len(c.mean) != len(c.std) or not c.mean:
        raise ConfigError(f"data.mean and data.std: need one value per channel each, got {len(c.mean)} and "
                          f"{len(c.std)}")
    _number(c, s, "train_subset", integer=True, low=1, optional=True)
    _number(c, s, "data_free_steps", integer=True, low=1, optional=True)
    if c.data_free_steps is not None:
        clash = [k for k in ("train_name", "train_source", "train_select", "train_subset", "sampler")
                 if getattr(c, k, None)]
        if clash:
            raise ConfigError(f"data.data_free_steps trains without data, so data.{clash[0]} has nothing to apply to; "
                              "drop one of them")
    if c.train_select is not None:
        from kdforge.data.ood import check_selection  # only here: it needs torch, config.py stays light

        c.train_select = check_selection(c.train_select, "data.train_select")
    _number(c, s, "val_subset", integer=True, low=1, optional=True)
    _number(c, s, "synthetic_train", integer=True, low=1)
    _number(c, s, "synthetic_test", integer=True, low=1)
    _number(c, s, "synthetic_size", integer=True, low=1)


# Sections whose unknown keys are kwargs of a callable rather than errors.
_OPEN = (ModelConfig, MethodConfig, EvalConfig)


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
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise _yaml_error(e, f"--set {text}") from None


def _yaml_error(e: yaml.YAMLError, where: str) -> ConfigError:
    """One line naming the file and line instead of PyYAML's multi-line report."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    context = getattr(e, "context", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    return ConfigError(f"{at}: invalid YAML: {problem}" + (f" ({context})" if context else ""))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a recipe (or start from `base`), apply `--set` overrides, and validate everything."""
    tree: dict[str, Any] = copy.deepcopy(dict(base or {}))  # overrides must not write into the caller's dict
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise _yaml_error(e, str(p)) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file, so not a YAML recipe") from None
        if loaded is None:  # else the defaults run, and fail later with a misleading message
            raise ConfigError(f"{p}: the recipe is empty; it needs at least a student (and a teacher and a method "
                              f"to distil), see recipes/")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping at the top level")
        tree.update(loaded or {})
    for item in overrides:
        key, value = parse_override(item)
        set_by_path(tree, key, value)
    return from_dict(RunConfig, tree)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file so a kill leaves either the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def expand_path(p: str | None) -> str | None:
    """`~` and `$VARS` in recipe paths; `${KDFORGE_SHARED_DATA}` defaults to ../shared/data."""
    if p is None:
        return None
    from kdforge import paths  # the one home of both defaults

    # expandvars handles every variable that is set; only kdforge's two need a default when unset or empty
    defaults = {"KDFORGE_SHARED_DATA": paths.default_shared_data, "KDFORGE_CACHE": paths.cache_home}
    for name, default in defaults.items():
        if not os.environ.get(name):
            p = p.replace("${" + name + "}", str(default())).replace("$" + name, str(default()))
    return os.path.expanduser(os.path.expandvars(p))


def default_shared_data() -> Path:
    """`$KDFORGE_SHARED_DATA`, else `<repo>/../shared/data` (kept here for callers; defined in kdforge.paths)."""
    from kdforge import paths

    return paths.default_shared_data()


def keyword_parameters(fn: Callable[..., Any] | type) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters `fn` takes, or None when it takes any. A class's are its __init__'s, followed
    through `**kwargs` handed up to the base classes' __init__ (a VEM method passes the baseline's options
    on), so subclass options are checked by name too."""
    classes = [c for c in fn.__mro__ if "__init__" in vars(c)] if isinstance(fn, type) else [None]
    params: dict[str, inspect.Parameter] = {}
    for cls in classes:
        try:
            sig = inspect.signature(cls.__init__ if cls is not None else fn)
        except (TypeError, ValueError):
            return None
        params.update({n: p for n, p in sig.parameters.items() if n not in params and n != "self"
                       and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            return params
    return None


def check_kwargs(fn: Callable[..., Any] | type, kwargs: dict[str, Any], what: str, also: Iterable[str] = ()) -> None:
    """Reject keyword arguments that `fn` (a callable, or a class: see `keyword_parameters`) does not take,
    naming them and the closest accepted one.

    `also` are other valid names the caller routes elsewhere (the API's training options), offered as
    suggestions too: `epoch=2` should point to `epochs` even though the method does not take it.
    """
    params = keyword_parameters(fn)
    if params is None:
        return
    accepted = list(params)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"unknown option {key!r} for {what}{did_you_mean(key, [*accepted, *also])}"
                              f" (accepted: {', '.join(accepted)})")
