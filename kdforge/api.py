"""The Python API. Every CLI verb is a thin layer over these functions, which take plain `nn.Module`s and
loaders: a kdforge BatchLoader, a CombinedLoader of several, DataFree, or a torch DataLoader of dict batches
(`kdforge.data.IndexedDataset`) or (image, label) pairs.

    import kdforge
    result = kdforge.distill(student, teacher, train_loader, method="kd", epochs=5, lr=0.05,
                             temperature=4.0, val_loader=test_loader)
    result.student, result.metrics["top1"]

Training settings and method options may be passed flat (told apart by name), or explicitly as
`train={...}` and `method_options={...}`; a name that is both (CRD's `bank_momentum` is not, SGD's
`momentum` is a training setting) must be passed explicitly, and the error says so.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import ConfigError, TrainConfig, check_kwargs, keyword_parameters
from kdforge.distillers.base import Distiller, last_linear
from kdforge.engine.checkpoint import seed_everything
from kdforge.engine.trainer import Trainer, resolve_device, to_batch
from kdforge.metrics.evaluators import build_evaluator
from kdforge.registry import DISTILLERS, RegistryError, did_you_mean

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class DistillResult:
    student: nn.Module
    metrics: dict[str, Any]  # final evaluation metrics (the evaluator's names: top1, psnr, ...)
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    distiller: Any = None
    teacher_metrics: dict[str, Any] | None = None
    stopped_early: bool = False  # train.max_steps ended the run before its last epoch
    best: dict[str, Any] | None = None  # {"metric", "mode", "value", "epoch"} of the monitored metric
    networks: dict[str, nn.Module] = field(default_factory=dict)  # every trained network by name


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
    info["num_classes"] = getattr(loader, "num_classes", None)
    info["num_groups"] = getattr(loader, "num_groups", None)
    info["image_mean"], info["image_std"] = getattr(loader, "mean", None), getattr(loader, "std", None)
    return info


def build_distiller(method: str, student: nn.Module, teacher: nn.Module | None, train_loader: Iterable,
                    **kwargs: Any) -> Distiller:
    """Instantiate a registered method, filling the facts it takes about the data (`n_data`, `input_shape`,
    `num_classes`, `num_groups`, `image_mean`, `image_std`) from the loader when the caller did not give them."""
    cls = DISTILLERS.get(method)
    check_kwargs(cls, kwargs, f"method {method!r}", also=sorted(_TRAIN_FIELDS))
    params = keyword_parameters(cls) or inspect.signature(cls.__init__).parameters
    facts = {"n_data": "the training-set size", "input_shape": "(C, H, W) of an input",
             "num_classes": "the number of classes", "num_groups": "the number of groups",
             "image_mean": "the per-channel mean images are normalised with",
             "image_std": "the per-channel std images are normalised with"}
    wanted = [k for k in facts if k in params and k not in kwargs]
    info = _loader_info(train_loader) if wanted else {}
    for key in wanted:
        if info.get(key) is not None:
            kwargs[key] = info[key]
        elif params[key].default is inspect.Parameter.empty:
            raise ValueError(f"method {method!r} needs {key} ({facts[key]}) and the loader does not say it; "
                             f"pass {key}=...")
    return cls(student, teacher, **kwargs)


def split_options(options: dict[str, Any], train: TrainConfig | dict[str, Any] | None, method: str,
                  method_options: dict[str, Any] | None) -> tuple[TrainConfig, dict[str, Any]]:
    """Tell training settings from method options by name; a name that is both must be passed explicitly."""
    base = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
    cls = DISTILLERS.get(method)
    method_params = set(keyword_parameters(cls) or inspect.signature(cls.__init__).parameters)
    clash = sorted(k for k in options if k in _TRAIN_FIELDS and k in method_params)
    if clash:
        raise ConfigError(f"option(s) {clash} name both a training setting and an option of method {method!r}; "
                          f"pass them in train={{...}} or method_options={{...}}")
    train_opts = {k: v for k, v in options.items() if k in _TRAIN_FIELDS}
    method_opts = {**(method_options or {}), **{k: v for k, v in options.items() if k not in _TRAIN_FIELDS}}
    return dataclasses.replace(base, **train_opts), method_opts


def _check_models(student: nn.Module, train_loader: Iterable, cfg: TrainConfig,
                  val_loader: Iterable | None = None) -> None:
    """Mistakes torch would report from deep inside the first step, named here with their fix. The class count
    the student must cover is the evaluated task's (val_loader's): trained on other data (out-of-domain images
    with their own labels), it still predicts the evaluated classes."""
    if str(cfg.precision) in ("32", "fp32"):
        odd = {p.dtype for p in student.parameters() if p.is_floating_point() and p.dtype != torch.float32}
        if odd:
            raise TypeError(f"the student ({type(student).__name__}) has {sorted(map(str, odd))} parameters but "
                            "batches are float32: call student.float(), or use train.precision for mixed precision")
    num_classes = getattr(val_loader, "num_classes", None) or getattr(train_loader, "num_classes", None)
    try:
        head_name = last_linear(student)
    except ValueError:
        return
    head = student.get_submodule(head_name)
    if num_classes and getattr(head, "out_features", num_classes) < num_classes:
        raise ValueError(f"the student's head ({type(student).__name__}.{head_name}) has "
                         f"{head.out_features} outputs but the data has {num_classes} classes: build it with "
                         f"num_classes={num_classes}")


def _with_sampler(loader: Iterable, sampler: Any) -> Iterable:
    if not hasattr(loader, "with_sampler"):
        raise TypeError(f"this method draws its batches with {type(sampler).__name__}, which needs a kdforge "
                        f"BatchLoader; got a {type(loader).__name__}")
    return loader.with_sampler(sampler)


def distill(student: nn.Module, teacher: nn.Module | None, train_loader: Iterable, *, method: str = "kd",
            val_loader: Iterable | None = None, run_dir: str | Path | None = None,
            resume: bool | str | Path = False, seed: int | None = 0,
            train: TrainConfig | dict[str, Any] | None = None, method_options: dict[str, Any] | None = None,
            evaluator: str | Callable[..., dict[str, Any]] | None = None, monitor: str | None = None,
            mode: str | None = None, config_dict: dict[str, Any] | None = None, **options: Any) -> DistillResult:
    """Distil `teacher` into `student` with a registered method and return the trained networks.

    `options` are training settings (any TrainConfig field: epochs, lr, optimizer, schedule, ...) and the
    method's own keyword arguments (temperature, kd_weight, student_layers, ...), told apart by name; or pass
    them as `train=` and `method_options=`. `evaluator` is a registered name ("classification", "groups",
    "images") or a callable (see kdforge.metrics.evaluators); `monitor`/`mode` pick the metric that "best"
    and the plateau schedule follow. With `run_dir`, metrics.jsonl and checkpoints are written there and
    `resume=True` continues a stopped run bit for bit.
    """
    DISTILLERS.get(method)  # an unknown name fails here, with the closest registered ones
    cfg, method_opts = split_options(options, train, method, method_options)
    _check_models(student, train_loader, cfg, val_loader)
    if seed is not None:  # before the distiller: its extra modules (regressors, embedders) draw their init
        seed_everything(seed)
    distiller = build_distiller(method, student, teacher, train_loader, **method_opts)
    sampler = distiller.train_sampler()
    if sampler is not None:
        train_loader = _with_sampler(train_loader, sampler)
    if cfg.teacher_cache and teacher is not None:
        _enable_teacher_cache(distiller, train_loader)
    if isinstance(evaluator, str):
        evaluator = build_evaluator(evaluator)
    trainer = Trainer(cfg, run_dir, evaluator=evaluator, monitor=monitor, mode=mode, config_dict=config_dict)
    fit = trainer.fit(distiller, train_loader, val_loader, resume=resume)
    return DistillResult(student=distiller.student, metrics=fit.metrics, history=fit.history, run_dir=fit.run_dir,
                         distiller=distiller, stopped_early=fit.stopped_early, best=fit.best,
                         networks=distiller.networks())


def _enable_teacher_cache(distiller: Distiller, loader: Iterable) -> None:
    deterministic = getattr(loader, "deterministic", None)
    if deterministic is False:
        raise ValueError("teacher_cache needs deterministic teacher inputs, but the train loader applies "
                         "random augmentation; turn augmentation off or the cache off")
    if deterministic is None:
        warnings.warn("teacher_cache: cannot tell whether this loader is deterministic; cached teacher "
                      "outputs are only correct if each sample index always gives the same image", stacklevel=3)
    if not hasattr(loader, "dataset_size") and not hasattr(loader, "dataset"):
        warnings.warn("teacher_cache: this loader may not yield sample indices (batch['index']); without them "
                      "the cache never takes effect", stacklevel=3)
    distiller.enable_teacher_cache()


def train(model: nn.Module, train_loader: Iterable, *, method: str = "scratch", **kwargs: Any) -> DistillResult:
    """Train `model` without a teacher (teachers, baselines): cross-entropy by default, or another teacher-free
    method (`method="pix2pix"`, `"dcgan"`: `model` is the generator); same options as `distill`."""
    return distill(model, None, train_loader, method=method, **kwargs)


def evaluate(model: nn.Module, loader: Iterable, *, evaluator: str | Callable[..., dict[str, Any]] = "classification",
             device: str = "auto", num_groups: int | None = None) -> dict[str, Any]:
    """Score `model` on `loader` with an evaluator (default: top-1/top-5 accuracy and mean CE, plus per-group
    accuracy when batches carry `group`). A Distiller is scored through its `predict`, against its teacher."""
    dev = resolve_device(device)
    if isinstance(evaluator, str):
        evaluator = build_evaluator(evaluator, **({"num_groups": num_groups} if num_groups else {}))
    was = model.training
    model.to(dev).eval()
    try:
        if isinstance(model, Distiller):
            reference = model.teacher_predict if model.teacher is not None else None
            return evaluator(model.predict, loader, dev, reference=reference, to_batch=to_batch)
        from kdforge.distillers.gan_base import generator_input  # an unconditional generator takes codes

        return evaluator(torch.no_grad()(lambda b: model(generator_input(model, b, train=False))), loader, dev,
                         to_batch=to_batch)
    finally:
        model.train(was)


def load_student(checkpoint: str | Path, model: nn.Module | None = None, *, network: str = "student",
                 model_config: Any = None, num_classes: int | None = None) -> nn.Module:
    """A trained network from a kdforge checkpoint (or a plain state dict): `network` names which one
    ("student"; a flow's "decoder"). Its architecture is `model`, else the run's saved config."""
    from kdforge.engine.checkpoint import load_checkpoint
    from kdforge.models import load_weights

    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("networks") or {}
    if network != "student":
        if network not in saved:
            raise RegistryError(f"{checkpoint} holds no network {network!r}{did_you_mean(network, list(saved))}"
                           f" (saved: {', '.join(sorted(saved)) or 'none'})")
        if model is None:  # only the method knows how to build its other networks: rebuild it from the config
            from kdforge.recipe import networks_from_checkpoint

            return networks_from_checkpoint(checkpoint)[network]
        state = saved[network]
    else:
        state = saved.get("student", ckpt.get("model", ckpt))
        if model is None:
            from kdforge.recipe import student_from_config

            model = student_from_config(ckpt, checkpoint, model_config, num_classes)
    load_weights(model, {"model": state})
    return model
