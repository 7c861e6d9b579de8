"""Recipes end to end: what `kdforge distill|train RECIPE` and `kdforge eval CHECKPOINT` do, on top of the
Python API (kdforge.api): data from the recipe's `data:` section, models by name, the method, the evaluator,
a run folder with config.yaml, metrics.jsonl, checkpoints/ and report.md.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.api import DistillResult, build_distiller, distill, evaluate
from kdforge.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    atomic_write_text,
    check_kwargs,
    expand_path,
    from_dict,
    load_config,
    save_config,
)
from kdforge.engine.checkpoint import load_checkpoint, seed_everything
from kdforge.engine.run_folder import RunFolder, open_run_folder
from kdforge.metrics.evaluators import build_evaluator, guess_mode
from kdforge.registry import DISTILLERS, MODELS


def resolve_num_classes(mc: ModelConfig, num_classes: int) -> None:
    """Give the model the dataset's class count unless the recipe set it or the factory cannot take it."""
    if "num_classes" in mc.kwargs:
        return
    try:
        params = inspect.signature(MODELS.get(mc.name)).parameters
    except (TypeError, ValueError):
        return
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        mc.kwargs["num_classes"] = num_classes


def build_model_from_config(mc: ModelConfig, num_classes: int | None = None, role: str = "model", *,
                            load: bool = True) -> nn.Module:
    """Build a model named in a recipe and load its weights when a path is given (and `load`)."""
    from kdforge.models import build_model, load_weights

    if num_classes is not None:
        mc = dataclasses.replace(mc, kwargs=dict(mc.kwargs))
        resolve_num_classes(mc, num_classes)
    kwargs = dict(mc.kwargs)
    check_kwargs(MODELS.get(mc.name), kwargs, f"{role} model {mc.name!r}")
    model = build_model(mc.name, **kwargs)
    if mc.weights and load:
        load_weights(model, expand_path(mc.weights))
    return model


def uses_teacher(cfg: RunConfig) -> bool:
    """Whether the run builds its teacher: the recipe names one and the method uses it (not scratch, pix2pix, dcgan,
    flow_mle: `trains_alone`)."""
    return cfg.teacher is not None and not DISTILLERS.get(cfg.method.name).trains_alone


def _evaluator(cfg: RunConfig):
    evaluator = build_evaluator(cfg.eval.name, **cfg.eval.kwargs)
    monitor = cfg.eval.monitor or evaluator.monitor
    mode = cfg.eval.mode or (evaluator.mode if monitor == evaluator.monitor else guess_mode(monitor))
    return evaluator, monitor, mode


def run_recipe(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
               eval_teacher: bool = True) -> DistillResult:
    """Data, models, method, evaluator, training and report, in the run folder `<out_dir>/<name>`, which is
    locked meanwhile (see kdforge.engine.run_folder for what --overwrite and --resume accept)."""
    if cfg.data.train_select and not uses_teacher(cfg):
        raise ConfigError(f"data.train_select: the teacher chooses the training samples, and this run has none "
                          f"({'no teacher section' if cfg.teacher is None else f'method {cfg.method.name}'}); set "
                          "data.train_select: null, or distil with a teacher")
    from kdforge.engine import distributed
    from kdforge.engine.trainer import resolve_device

    ctx = distributed.init_from_env(resolve_device(cfg.train.device))  # a world of one outside torchrun
    if not ctx.enabled:
        with open_run_folder(expand_path(cfg.out_dir), cfg.name, resume=resume, overwrite=overwrite) as folder:
            return _run_in(folder, cfg, resume=resume, eval_teacher=eval_teacher)
    # data parallel: rank 0 prepares the data and owns (locks) the run folder; the others wait for both
    from kdforge.data.build import load_splits

    folder = None
    try:
        if ctx.is_main:
            load_splits(cfg.data)  # decoded into the cache once, not by every rank at the same time
            folder = open_run_folder(expand_path(cfg.out_dir), cfg.name, resume=resume, overwrite=overwrite)
        distributed.barrier()
        return _run_in(folder or _Shared(Path(expand_path(cfg.out_dir)) / cfg.name), cfg, resume=resume,
                       eval_teacher=eval_teacher, ctx=ctx)
    finally:
        if folder is not None:
            folder.close()


class _Shared:
    """The run folder as ranks other than 0 see it: its path; rank 0 holds the lock and writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check_resume_config(self, config: dict[str, Any]) -> None:
        pass  # rank 0 checks


def _run_in(folder: RunFolder | _Shared, cfg: RunConfig, *, resume: bool, eval_teacher: bool,
            ctx: Any = None) -> DistillResult:
    from kdforge.data.build import build_loaders
    from kdforge.engine import distributed
    from kdforge.report.run_report import write_run_report

    ctx = ctx or distributed.current()
    run_dir = folder.path
    seed_everything(cfg.seed)
    data = build_loaders(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    method = cfg.method.name
    use_teacher = uses_teacher(cfg)
    for mc in (cfg.student, cfg.teacher if use_teacher else None):
        if mc is not None:  # the class count of the evaluation data, also when training on other (OOD) data
            resolve_num_classes(mc, data.num_classes)
    if resume:  # the saved config is the resolved one: compare once num_classes is filled in
        folder.check_resume_config(cfg.to_dict())
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")  # the resolved config, num_classes included
    evaluator, monitor, mode = _evaluator(cfg)
    student = build_model_from_config(cfg.student, role="student")
    teacher, teacher_metrics = None, None
    if use_teacher:
        teacher = build_model_from_config(cfg.teacher, role="teacher")
        if cfg.data.train_select:  # the teacher picks the training samples (OOD subset), cached per teacher
            from kdforge.data.build import select_train
            from kdforge.engine.trainer import resolve_device

            data = select_train(data, cfg.data, teacher, seed=cfg.seed, device=resolve_device(cfg.train.device),
                                progress=print if cfg.train.progress else None)
    if ctx.is_main:
        _save_sample_grid(data.train, run_dir / "samples.png")
    # a method whose own predict scores the teacher (flow_kd's teacher pairing) needs no separate teacher run
    if use_teacher and eval_teacher and ctx.is_main and not DISTILLERS.get(method).predict_scores_teacher:
        teacher_metrics = _cached_teacher_eval(run_dir, cfg, teacher, data.val, evaluator)
    result = distill(student, teacher, data.train, method=method, val_loader=data.val, run_dir=run_dir,
                     resume=resume, seed=cfg.seed, train=cfg.train, method_options=cfg.method.kwargs,
                     evaluator=evaluator, monitor=monitor, mode=mode, config_dict=cfg.to_dict())
    result.teacher_metrics = teacher_metrics
    if ctx.is_main:
        if cfg.eval.tsne > 0:
            _tsne(result.student, data, cfg, run_dir / "tsne.png")
        write_run_report(run_dir, cfg, result, monitor=monitor, mode=mode, evaluator=cfg.eval.name)
    if ctx.enabled:
        distributed.barrier()  # the report is written before any rank returns
    return result


def _save_sample_grid(loader: Any, path: Path) -> None:
    """The first training batch as the model sees it (after augmentation), to eyeball the data."""
    if path.exists() or not hasattr(loader, "get_batch"):
        return
    from kdforge.data import make_grid_image

    make_grid_image(loader.get_batch(0)["image"][:64], path, loader.mean, loader.std, nrow=8)


def _tsne(student: nn.Module, data: Any, cfg: RunConfig, path: Path) -> None:
    """MFD's Figure 5 for this run: the student's penultimate features of a seeded sample of the val split,
    coloured by class and by group (the supplement's t-SNE settings)."""
    import torch

    from kdforge.engine.trainer import resolve_device, to_batch
    from kdforge.report.fairness_plots import penultimate_features, tsne_plot

    feats, labels, groups = penultimate_features(student, data.val, resolve_device(cfg.train.device),
                                                 max_samples=None, to_batch=to_batch)
    tsne_plot(feats, labels, groups if groups is not None else torch.zeros_like(labels), path,
              max_samples=cfg.eval.tsne, class_names=data.classes)


def _cached_teacher_eval(run_dir: Path, cfg: RunConfig, teacher: nn.Module, loader: Any,
                         evaluator: Any) -> dict[str, Any]:
    """The teacher's score with the run's evaluator, computed once per run (a resumed run reuses it) and
    stamped with the teacher and evaluator it belongs to, so a stale file is never shown for another model."""
    path = run_dir / "teacher_metrics.json"
    stamp = {"teacher": dataclasses.asdict(cfg.teacher), "eval": dataclasses.asdict(cfg.eval),
             "data": {k: getattr(cfg.data, k) for k in ("name", "val_split", "val_subset")}}
    stamp = json.loads(json.dumps(stamp, default=str))
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("stamp") == stamp:
                return saved["metrics"]
        except (ValueError, KeyError):
            pass
    metrics = evaluate(teacher, loader, evaluator=evaluator, device=cfg.train.device)
    atomic_write_text(path, json.dumps({"stamp": stamp, "metrics": metrics}, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------- checkpoints
def _config_of(ckpt: dict[str, Any], checkpoint: str | Path) -> RunConfig:
    conf = ckpt.get("config") or {}
    if "student" not in conf:
        raise ValueError(f"{checkpoint} carries no config; pass the model architecture explicitly")
    return load_config(None, base=conf)


def student_from_config(ckpt: dict[str, Any], checkpoint: str | Path, model_config: ModelConfig | None,
                        num_classes: int | None) -> nn.Module:
    """The student architecture of a checkpoint's run (weights are loaded by the caller)."""
    if model_config is None:
        conf = ckpt.get("config") or {}
        if "student" not in conf:
            raise ValueError(f"{checkpoint} carries no config; pass the model architecture explicitly")
        model_config = from_dict(ModelConfig, conf["student"], "student")
    return build_model_from_config(dataclasses.replace(model_config, weights=None), num_classes, "student")


def rebuild_distiller(cfg: RunConfig, data: Any, *, teacher_weights: bool = True):
    """The run's method with its networks, as `run_recipe` built it (teacher weights loaded if asked)."""
    student = build_model_from_config(cfg.student, role="student", load=False)
    teacher = None
    if uses_teacher(cfg):
        teacher = build_model_from_config(cfg.teacher, role="teacher", load=teacher_weights)
    seed_everything(cfg.seed)
    return build_distiller(cfg.method.name, student, teacher, data.train, **dict(cfg.method.kwargs))


def networks_from_checkpoint(checkpoint: str | Path) -> dict[str, nn.Module]:
    """Every trained network of a recipe run, by name, with the checkpoint's weights."""
    from kdforge.data.build import build_loaders

    ckpt = load_checkpoint(checkpoint)
    cfg = _config_of(ckpt, checkpoint)
    distiller = rebuild_distiller(cfg, build_loaders(cfg.data, seed=cfg.seed), teacher_weights=False)
    distiller.load_from_checkpoint(ckpt["distiller"])
    return distiller.networks()


def evaluate_checkpoint(checkpoint: str | Path, cfg: RunConfig, *, model_name: str | None = None,
                        ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `kdforge eval` prints: the run's evaluator on `cfg.data`'s val split. A kdforge training
    checkpoint is scored as its run scored it (the method's `predict`, its teacher as reference); a plain
    state dict, or `model_name`, as a single model. `ckpt`: the checkpoint already read, if the caller has it."""
    from kdforge.api import load_student
    from kdforge.data.build import build_loaders

    ckpt = load_checkpoint(checkpoint) if ckpt is None else ckpt
    data = build_loaders(cfg.data, seed=cfg.seed)
    evaluator, _, _ = _evaluator(cfg)
    if "distiller" in ckpt and model_name is None:
        distiller = rebuild_distiller(cfg, data)
        distiller.load_from_checkpoint(ckpt["distiller"])
        return evaluate(distiller, data.val, evaluator=evaluator, device=cfg.train.device)
    model_cfg = cfg.student if not model_name else from_dict(ModelConfig, {"name": model_name}, "model")
    model = load_student(checkpoint, model_config=model_cfg, num_classes=data.num_classes)
    return evaluate(model, data.val, evaluator=evaluator, device=cfg.train.device)
