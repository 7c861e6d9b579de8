"""The Python API. Every CLI verb is a thin layer over these functions, which take plain `nn.Module`s
and any iterable of batches (a kdforge BatchLoader or a torch DataLoader of (image, label[, index])).

    import kdforge
    result = kdforge.distill(student, teacher, train_loader, method="kd", epochs=5, lr=0.05,
                             temperature=4.0, val_loader=test_loader)
    result.student, result.metrics["top1"]
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_kwargs,
    expand_path,
    save_config,
)
from kdforge.engine.checkpoint import load_checkpoint, seed_everything
from kdforge.engine.trainer import Trainer, resolve_device, to_batch
from kdforge.metrics.classification import evaluate_classifier
from kdforge.registry import DISTILLERS, did_you_mean

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class DistillResult:
    student: nn.Module
    metrics: dict[str, Any]  # final validation metrics (top1, top5, loss, ...)
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    distiller: Any = None
    teacher_metrics: dict[str, Any] | None = None
    stopped_early: bool = False  # train.max_steps ended the run before its last epoch


def _loader_info(loader: Iterable) -> dict[str, Any]:
    """Dataset size and input shape of a loader, read without drawing a batch where possible."""
    info: dict[str, Any] = {}
    size = getattr(loader, "dataset_size", None)
    if size is None and hasattr(loader, "dataset"):
        try:
            size = len(loader.dataset)  # type: ignore[attr-defined]
        except TypeError:
            size = None
    info["n_data"] = size
    shape = getattr(loader, "image_shape", None)  # kdforge's BatchLoader knows it
    if shape is None and hasattr(loader, "dataset"):
        try:
            first = loader.dataset[0]  # type: ignore[index]
            x = first["image"] if isinstance(first, dict) else first[0]
            shape = tuple(x.shape)
        except Exception:
            shape = None
    info["input_shape"] = tuple(shape) if shape is not None else None
    return info


def build_distiller(method: str, student: nn.Module, teacher: nn.Module | None, train_loader: Iterable,
                    **kwargs: Any):
    """Instantiate a registered method, filling `n_data` / `input_shape` from the loader when it takes them."""
    cls = DISTILLERS.get(method)
    check_kwargs(cls.__init__, kwargs, f"method {method!r}", also=sorted(_TRAIN_FIELDS))
    params = inspect.signature(cls.__init__).parameters
    wanted = [k for k in ("n_data", "input_shape") if k in params and k not in kwargs]
    info = _loader_info(train_loader) if wanted else {}
    for key in wanted:
        if info.get(key) is not None:
            kwargs[key] = info[key]
    if "n_data" in params and params["n_data"].default is inspect.Parameter.empty and "n_data" not in kwargs:
        raise ValueError(f"method {method!r} needs n_data (the training-set size); pass n_data=...")
    return cls(student, teacher, **kwargs)


def _split_options(options: dict[str, Any], train: TrainConfig | dict[str, Any] | None, method: str,
                   method_options: dict[str, Any] | None) -> tuple[TrainConfig, dict]:
    """Tell training settings from method options by name; a name that is both must be passed explicitly."""
    base = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
    method_params = set(inspect.signature(DISTILLERS.get(method).__init__).parameters)
    clash = sorted(k for k in options if k in _TRAIN_FIELDS and k in method_params)
    if clash:
        raise ConfigError(f"option(s) {clash} name both a training setting and an option of method {method!r}; "
                          f"pass them in train={{...}} or method_options={{...}}")
    train_opts = {k: v for k, v in options.items() if k in _TRAIN_FIELDS}
    method_opts = {**(method_options or {}), **{k: v for k, v in options.items() if k not in _TRAIN_FIELDS}}
    return dataclasses.replace(base, **train_opts), method_opts


def distill(student: nn.Module, teacher: nn.Module | None, train_loader: Iterable, *, method: str = "kd",
            val_loader: Iterable | None = None, run_dir: str | Path | None = None,
            resume: bool | str | Path = False, seed: int | None = 0,
            train: TrainConfig | dict[str, Any] | None = None,
            evaluator: Callable[..., dict[str, Any]] | None = None,
            config_dict: dict[str, Any] | None = None, method_options: dict[str, Any] | None = None,
            **options: Any) -> DistillResult:
    """Distil `teacher` into `student` with a registered method and return the trained student.

    `options` are training settings (any TrainConfig field: epochs, lr, optimizer, schedule, ...) and the
    method's own keyword arguments (temperature, alpha, student_layers, ...), told apart by name. With
    `run_dir`, metrics.jsonl and checkpoints are written there and `resume=True` continues a stopped run.
    """
    if method not in DISTILLERS:
        raise ConfigError(f"unknown method {method!r}{did_you_mean(method, DISTILLERS.names())}"
                          f" (registered: {', '.join(DISTILLERS.names())})")
    cfg, method_opts = _split_options(options, train, method, method_options)
    if seed is not None:  # before the distiller: its extra modules (regressors, embedders) draw their init
        seed_everything(seed)
    distiller = build_distiller(method, student, teacher, train_loader, **method_opts)
    if cfg.teacher_cache and teacher is not None:
        deterministic = getattr(train_loader, "deterministic", None)
        if deterministic is False:
            raise ValueError("teacher_cache needs deterministic teacher inputs, but the train loader applies "
                             "random augmentation; turn augmentation off or the cache off")
        if deterministic is None:
            warnings.warn("teacher_cache: cannot tell whether this loader is deterministic; cached teacher "
                          "outputs are only correct if each sample index always gives the same image",
                          stacklevel=2)
        distiller.enable_teacher_cache()
    trainer = Trainer(cfg, run_dir, evaluator=evaluator, config_dict=config_dict)
    fit = trainer.fit(distiller, train_loader, val_loader, resume=resume)
    return DistillResult(student=distiller.student, metrics=fit.metrics, history=fit.history,
                         run_dir=fit.run_dir, distiller=distiller, stopped_early=fit.stopped_early)


def train(model: nn.Module, train_loader: Iterable, **kwargs: Any) -> DistillResult:
    """Train `model` from scratch with cross-entropy (teachers, baselines); same options as `distill`."""
    return distill(model, None, train_loader, method="scratch", **kwargs)


def evaluate(model: nn.Module, loader: Iterable, *, device: str = "auto",
             num_groups: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean CE of `model` on `loader` (plus per-group accuracy with num_groups)."""
    dev = resolve_device(device)
    was = model.training
    model.to(dev).eval()
    try:
        return evaluate_classifier(lambda b: model(b["image"]), loader, dev, to_batch=to_batch,
                                   num_groups=num_groups or getattr(loader, "num_groups", None))
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------- recipes
def resolve_num_classes(mc: ModelConfig, num_classes: int) -> None:
    """Give the model the dataset's class count unless the recipe set it or the factory cannot take it."""
    from kdforge.registry import MODELS

    if "num_classes" in mc.kwargs:
        return
    try:
        params = inspect.signature(MODELS.get(mc.name)).parameters
    except (TypeError, ValueError):
        return
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        mc.kwargs["num_classes"] = num_classes


def build_model_from_config(mc: ModelConfig, num_classes: int | None = None, role: str = "model") -> nn.Module:
    """Build a model named in a recipe and load its weights when a path is given."""
    from kdforge.models import build_model, load_weights
    from kdforge.registry import MODELS

    if num_classes is not None:
        mc = dataclasses.replace(mc, kwargs=dict(mc.kwargs))
        resolve_num_classes(mc, num_classes)
    kwargs = dict(mc.kwargs)
    check_kwargs(MODELS.get(mc.name), kwargs, f"{role} model {mc.name!r}")
    model = build_model(mc.name, **kwargs)
    if mc.weights:
        load_weights(model, expand_path(mc.weights))
    return model


def prepare_run_dir(cfg: RunConfig, *, resume: bool, overwrite: bool = False) -> Path:
    run_dir = Path(expand_path(cfg.out_dir)) / cfg.name
    last = run_dir / "checkpoints" / "last.pt"
    if run_dir.exists() and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        elif last.exists():
            raise FileExistsError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                                  f"--overwrite to replace it, or --set name=<new name>")
    if resume and not last.exists():
        raise FileNotFoundError(f"nothing to resume: {last} does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_recipe(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
               eval_teacher: bool = True) -> DistillResult:
    """What `kdforge distill/train RECIPE` does: data, models, method, training, report, in a run folder."""
    from kdforge.data.build import build_loaders
    from kdforge.report.run_report import write_run_report

    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    seed_everything(cfg.seed)
    data = build_loaders(cfg.data, seed=cfg.seed)
    method = cfg.method.name
    use_teacher = cfg.teacher is not None and method != "scratch"
    for mc in (cfg.student, cfg.teacher if use_teacher else None):
        if mc is not None:
            resolve_num_classes(mc, data.num_classes)
    save_config(cfg, run_dir / "config.yaml")  # the resolved config, num_classes included
    _save_sample_grid(data.train, run_dir / "samples.png")
    student = build_model_from_config(cfg.student, role="student")
    teacher, teacher_metrics = None, None
    if use_teacher:
        teacher = build_model_from_config(cfg.teacher, role="teacher")
        if eval_teacher:
            teacher_metrics = _cached_teacher_eval(run_dir, teacher, data.val, cfg.train.device)
    result = distill(student, teacher, data.train, method=method, val_loader=data.val, run_dir=run_dir,
                     resume=resume, seed=cfg.seed, train=cfg.train, config_dict=cfg.to_dict(),
                     method_options=cfg.method.kwargs)
    result.teacher_metrics = teacher_metrics
    write_run_report(run_dir, cfg, result)
    return result


def _save_sample_grid(loader: Any, path: Path) -> None:
    """The first training batch as the model sees it (after augmentation), to eyeball the data."""
    if path.exists() or not hasattr(loader, "get_batch"):
        return
    from kdforge.data import make_grid_image

    make_grid_image(loader.get_batch(0)["image"][:64], path, loader.mean, loader.std, nrow=8)


def _cached_teacher_eval(run_dir: Path, teacher: nn.Module, loader: Iterable, device: str) -> dict[str, Any]:
    path = run_dir / "teacher_metrics.json"
    if path.exists():  # a resumed run does not evaluate the teacher again
        return json.loads(path.read_text())
    metrics = evaluate(teacher, loader, device=device)
    path.write_text(json.dumps(metrics, indent=1))
    return metrics


def load_student(checkpoint: str | Path, model: nn.Module | None = None,
                 model_config: ModelConfig | None = None, num_classes: int | None = None) -> nn.Module:
    """A student from a kdforge checkpoint; its architecture comes from `model`, or else the run's config."""
    from kdforge.config import from_dict
    from kdforge.models import load_weights

    ckpt = load_checkpoint(checkpoint)
    if model is None:
        if model_config is None:
            conf = ckpt.get("config") or {}
            if "student" not in conf:
                raise ValueError(f"{checkpoint} carries no config; pass the model architecture explicitly")
            model_config = from_dict(ModelConfig, conf["student"], "student")
        model = build_model_from_config(dataclasses.replace(model_config, weights=None), num_classes, "student")
    state = ckpt.get("model", ckpt)
    load_weights(model, {"model": state})
    return model

