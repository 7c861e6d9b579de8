"""The training loop. It knows devices, precision, schedules, checkpoints and logging, and the Distiller
contract (kdforge.distillers.base); it never names a method.

Resume is exact: a checkpoint holds the method's modules, every optimiser and schedule, the grad scaler, the
RNG states and the position in the data order (stage, epoch, batches done). Loaders with `set_epoch` +
`iter_from` (kdforge's BatchLoader, CombinedLoader) jump straight to that batch; any other iterable is
replayed from the RNG state saved at the start of the epoch and the finished batches are skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdforge.engine import distributed
from kdforge.engine.checkpoint import (
    NonFiniteStateError,
    assert_finite_state,
    load_checkpoint_with_fallback,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdforge.engine.logging import MetricsLogger
from kdforge.engine.optim import build_scheduler
from kdforge.metrics.evaluators import ClassificationEvaluator, guess_mode

CHECKPOINT_FORMAT = "kdforge-checkpoint/1"
PRECISIONS = {"32": None, "fp32": None, "bf16": torch.bfloat16, "16": torch.float16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """A loss, gradient norm, parameter or buffer became NaN or Inf; the message names it and the step."""


@dataclass
class FitResult:
    metrics: dict[str, Any]  # the last evaluation (or last training losses when there is no val loader)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    run_dir: Path | None = None
    stopped_early: bool = False  # max_steps reached before the last epoch ended
    best: dict[str, Any] | None = None  # {"metric", "mode", "value", "epoch"} of the monitored metric


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _move(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and k == "image" and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        elif isinstance(v, dict):  # a named sub-batch of a CombinedLoader
            v = _move(v, device, channels_last)
        out[k] = v
    return out


def compile_networks(distiller, mode: str = "default") -> list[str]:
    """torch.compile the teacher and the method's networks in place (`nn.Module.compile`): module names, feature
    taps by name and checkpoint keys stay as they are (a torch.compile wrapper would prefix them "_orig_mod.").
    The method's small extras (regressors, embedders) run eagerly. Returns the names compiled."""
    nets = {**({"teacher": distiller.teacher} if distiller.teacher is not None else {}), **distiller.networks()}
    for net in nets.values():
        net.compile(mode=None if mode == "default" else mode)
    return list(nets)


def to_batch(raw: Any, device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move a batch to `device` as a dict. Dict batches pass through (nested dicts too); an (image, label)
    pair becomes {"image", "label"}, and (image, label, {extras}) adds the extras by name."""
    if isinstance(raw, dict):
        batch = raw
    elif isinstance(raw, (tuple, list)) and len(raw) == 2:
        batch = {"image": raw[0], "label": raw[1]}
    elif isinstance(raw, (tuple, list)) and len(raw) == 3 and isinstance(raw[2], dict):
        batch = {"image": raw[0], "label": raw[1], **raw[2]}
    else:
        what = f"a {len(raw)}-tuple" if isinstance(raw, (tuple, list)) else f"a {type(raw).__name__}"
        raise TypeError(f"a batch must be a dict, an (image, label) pair or (image, label, {{name: tensor}}); got "
                        f"{what}. A third element could be a sample index or a group, so kdforge will not guess: "
                        "yield dicts, e.g. wrap the dataset in kdforge.data.IndexedDataset(dataset, group=...)")
    return _move(batch, device, channels_last)


def loader_length(loader: Iterable, what: str = "train loader") -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"the {what} ({type(loader).__name__}) has no len(): schedules and exact resume need the "
                        "number of batches per epoch. Give it __len__, or use kdforge.data.DataFree(steps, ...) "
                        "for a data-free method") from None
    if n == 0:
        raise ValueError(f"the {what} yields no batches (a dataset smaller than one batch with drop_last?)")
    return n


class Trainer:
    """Runs a Distiller over a train loader; evaluates, logs and checkpoints into `run_dir`.

    `evaluator(predict, loader, device, reference=..., to_batch=...) -> {metric: value}` scores the
    distiller's `predict` (default: classification accuracy); `monitor` (default: the evaluator's own) names
    the metric the plateau schedule and "best" follow, `mode` whether higher ("max") or lower is better.
    """

    def __init__(self, cfg: Any, run_dir: str | Path | None = None, *,
                 evaluator: Callable[..., dict[str, Any]] | None = None, monitor: str | None = None,
                 mode: str | None = None, config_dict: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.evaluator = evaluator or ClassificationEvaluator()
        own = getattr(self.evaluator, "monitor", "loss")
        self.monitor = monitor or own
        self.mode = mode or (getattr(self.evaluator, "mode", None) if self.monitor == own else None) \
            or guess_mode(self.monitor)
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        self.config_dict = config_dict or {}
        if str(cfg.precision) not in PRECISIONS:
            raise ValueError(f"unknown precision {cfg.precision!r}; use one of {', '.join(PRECISIONS)}")

    # ------------------------------------------------------------------ the loop
    def fit(self, distiller, train_loader: Iterable, val_loader: Iterable | None = None,
            resume: bool | str | Path = False) -> FitResult:
        """Train through every stage of `distiller`; evaluate on `val_loader` after each epoch."""
        cfg = self.cfg
        steps_per_epoch = loader_length(train_loader)
        distiller.to(self.device)
        if cfg.channels_last:
            distiller.to(memory_format=torch.channels_last)
        if cfg.compile:
            compile_networks(distiller, cfg.compile_mode)
        distiller.steps_per_epoch = steps_per_epoch
        distiller._stepper = self._optimizer_step
        self.dist = distributed.current()  # a world of one unless torchrun started this process in a group
        self.writes = self.dist.is_main  # only rank 0 writes metrics, checkpoints and samples
        self.logger = MetricsLogger(self.run_dir if self.writes else None, cfg.tensorboard)
        self.scaler = (torch.amp.GradScaler("cuda") if str(cfg.precision) in ("16", "fp16")
                       and self.device.type == "cuda" else None)
        self.pos = {"stage": 0, "epoch": 0, "batch": 0, "step": 0}
        self.history: list[dict[str, Any]] = []
        self.opts, self.scheds, self.main_name = {}, {}, None
        self.epoch_rng, self.sums, self.n_done = None, {}, 0
        ckpt = self._restore(distiller, resume) if resume else None
        if self.dist.enabled:  # one starting state on every rank, whatever each initialised locally
            distributed.broadcast_state(distiller)
            distributed.broadcast_rng(self.device)  # ranks draw noise in step (distributed.randn keeps a block)
            if cfg.sync_batchnorm:
                distributed.sync_batchnorm(distiller, self.device)
        stages = distiller.stages(cfg.epochs)
        ends = list(itertools.accumulate(s.epochs for s in stages))
        try:
            for stage_idx, stage in enumerate(stages):
                begin, end = ends[stage_idx] - stage.epochs, ends[stage_idx]
                if self.pos["epoch"] >= end:  # the stage follows from the epoch: a finished run may be extended
                    continue
                distiller.set_stage(stage)
                self._configure_optimizers(distiller, stage.name, stage.epochs * steps_per_epoch, steps_per_epoch)
                if ckpt is not None:
                    if self.pos["epoch"] > begin or self.pos["batch"] > 0:  # else this stage has not begun
                        self._load_optimizers(ckpt)
                    set_rng_state(ckpt["rng"])
                for epoch in range(max(self.pos["epoch"], begin), end):
                    if not self._train_epoch(distiller, train_loader, stage_idx, epoch, ckpt):
                        return self._result(distiller, val_loader, stopped_early=True)
                    ckpt = None
                    self._end_epoch(distiller, stage_idx, epoch, val_loader, stage_done=epoch + 1 == end)
                ckpt = None
        finally:
            self.logger.close()
            distiller._stepper = None
        return self._result(distiller, None)

    def _train_epoch(self, distiller, loader: Iterable, stage_idx: int, epoch: int,
                     ckpt: dict[str, Any] | None) -> bool:
        """One epoch, from the checkpoint's batch when resuming; False when max_steps ended the run."""
        cfg = self.cfg
        resuming = ckpt is not None and epoch == self.pos["epoch"] and self.pos["batch"] > 0
        start = self.pos["batch"] if resuming else 0
        self.epoch_rng = ckpt["epoch_rng"] if resuming else torch.get_rng_state()
        # float32 sums round-trip exactly through Python floats, so a resumed epoch logs the same means
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                     for k, v in (ckpt.get("epoch_sums", {}) if resuming else {}).items()}
        self.n_done = int(ckpt.get("epoch_batches", 0)) if resuming else 0
        self.t0 = time.perf_counter()
        distiller.epoch = epoch
        distiller.train()
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
        bar = tqdm(self._batches(loader, epoch, start), total=steps_per_epoch, initial=start,
                   disable=not cfg.progress, leave=False, desc=f"{distiller.stage} epoch {epoch + 1}/{cfg.epochs}")
        try:
            for batch_idx, raw in enumerate(bar, start=start):
                batch = to_batch(raw, self.device, cfg.channels_last)
                with self._autocast():
                    losses = distiller.training_step(batch)
                total = self._main_step(distiller, losses, epoch)
                if self.scaler is not None:
                    self.scaler.update()  # once per step, after every optimiser stepped
                for sc in self.scheds.values():
                    if sc is not None and not isinstance(sc, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        sc.step()
                self.pos["step"] += 1
                distiller.global_step = self.pos["step"]
                for k, v in {**losses, **({"loss": total} if total is not None else {})}.items():
                    self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
                self.n_done += 1
                if cfg.log_every and self.pos["step"] % cfg.log_every == 0:
                    rec = {k: float(v) / self.n_done for k, v in self._rank_mean(self.sums).items()}
                    bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()})
                    self.logger.log({"kind": "step", "step": self.pos["step"], "epoch": epoch, **self._lrs(), **rec})
                here = {"stage": stage_idx, "epoch": epoch, "batch": batch_idx + 1, "step": self.pos["step"]}
                if cfg.checkpoint_every and self.pos["step"] % cfg.checkpoint_every == 0:
                    self._save(distiller, here, mid_epoch=True)
                if cfg.max_steps is not None and self.pos["step"] >= cfg.max_steps:
                    if batch_idx + 1 < steps_per_epoch or epoch + 1 < cfg.epochs:
                        self._save(distiller, here, mid_epoch=True)
                        return False
        finally:
            bar.close()
        return True

    def _end_epoch(self, distiller, stage_idx: int, epoch: int, val_loader: Iterable | None, *,
                   stage_done: bool) -> None:
        """Evaluate, log the epoch record and checkpoint at the start of the next epoch."""
        cfg = self.cfg
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": self.pos["step"],
                                  "stage": distiller.stage, **self._lrs(),
                                  "epoch_time_s": time.perf_counter() - self.t0}
        record.update({f"train_{k}": float(v) / max(1, self.n_done) for k, v in self._rank_mean(self.sums).items()})
        if self.dist.enabled:  # BatchNorm statistics: rank 0's, before it is scored and saved
            distributed.broadcast_buffers(distiller)
        record.update(self._snapshot(distiller, epoch))
        if val_loader is not None and ((epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs):
            metrics = self.evaluate(distiller, val_loader)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            for sc in self.scheds.values():
                if isinstance(sc, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sc.step(self._monitored(metrics))
        self.history.append(record)
        self.logger.log(record)
        self.pos.update(epoch=epoch + 1, batch=0, stage=stage_idx + stage_done)
        self._save(distiller, dict(self.pos), mid_epoch=False)

    def _snapshot(self, distiller, epoch: int) -> dict[str, Any]:
        """Save the method's epoch images as grids under samples/; return its other values for the record."""
        was_training = distiller.training
        distiller.eval()
        try:
            snap = distiller.epoch_snapshot()
        finally:
            distiller.train(was_training)
        values = {}
        for name, v in snap.items():
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                if self.run_dir is not None and self.writes:
                    from torchvision.utils import save_image  # only methods with images need torchvision here

                    folder = Path(self.run_dir) / "samples"
                    folder.mkdir(parents=True, exist_ok=True)
                    save_image(v.detach().float().cpu().clamp(0, 1), folder / f"{name}_epoch{epoch + 1:03d}.png",
                               nrow=8, padding=1)
            else:
                values[name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return values

    def _result(self, distiller, val_loader: Iterable | None, *, stopped_early: bool = False) -> FitResult:
        if stopped_early:
            metrics = self.evaluate(distiller, val_loader) if val_loader is not None else {}
        else:
            last = self.history[-1] if self.history else {}
            metrics = {k[4:]: v for k, v in last.items() if k.startswith("val_")} or last
        return FitResult(metrics, self.history, self.run_dir, stopped_early, self._best())

    # ------------------------------------------------------------------ optimisers
    def _configure_optimizers(self, distiller, stage: str, stage_steps: int, steps_per_epoch: int) -> None:
        """The stage's optimisers and their schedules: the recipe's by default, a named one, a scheduler
        the method built, or None (constant)."""
        self.opts, self.scheds = {}, {}
        for name, spec in distiller.configure_optimizers(stage, self.cfg, stage_steps).items():
            opt, sched = spec if isinstance(spec, tuple) else (spec, "")
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"configure_optimizers of {type(distiller).__name__}: {name!r} is a "
                                f"{type(opt).__name__}, not a torch optimizer")
            if isinstance(sched, str):
                cfg = dataclasses.replace(self.cfg, schedule=sched) if sched else self.cfg
                sched = build_scheduler(opt, cfg, stage_steps, steps_per_epoch, mode=self.mode)
            self.opts[name], self.scheds[name] = opt, sched
        main = self.main_name = distiller.main_optimizer
        if main is not None and main not in self.opts:
            raise KeyError(f"{type(distiller).__name__}.main_optimizer is {main!r}, but configure_optimizers "
                           f"returned {sorted(self.opts)}")
        distiller.optimizers = self.opts

    def _load_optimizers(self, ckpt: dict[str, Any]) -> None:
        for k, o in self.opts.items():
            o.load_state_dict(ckpt["optimizers"][k])
        for k, sc in self.scheds.items():
            if sc is not None:
                sc.load_state_dict(ckpt["schedulers"][k])

    def _lrs(self) -> dict[str, float]:
        """`lr` of the main optimiser (else the first), and `lr_<name>` of each when there are several."""
        if not self.opts:
            return {}
        lrs = {k: o.param_groups[0]["lr"] for k, o in self.opts.items()}
        out = {"lr": lrs.get(self.main_name, next(iter(lrs.values())))}
        if len(lrs) > 1:
            out.update({f"lr_{k}": v for k, v in lrs.items()})
        return out

    def _main_step(self, distiller, losses: dict[str, torch.Tensor], epoch: int) -> torch.Tensor | None:
        """Check every term is finite, then step the main optimiser on the sum of the grad-carrying terms."""
        if not isinstance(losses, dict) or not losses:
            raise TypeError("training_step must return a non-empty dict of named losses")
        terms = torch.stack([v.detach().float().sum() for v in losses.values()])
        finite = bool(torch.isfinite(terms).all())  # one device sync a step; name the culprit only on failure
        if self.dist.enabled:  # every rank stops together, none is left waiting in the next all-reduce
            finite = distributed.all_finite(finite, terms.device)
        if not finite:
            k, v = next(((k, v) for k, v in losses.items() if not torch.isfinite(v.detach()).all()),
                        ("(on another rank)", terms.sum()))
            raise NonFiniteLossError(
                f"loss term {k!r} is {float(v.detach().float().sum())} at epoch {epoch + 1}, step "
                f"{self.pos['step'] + 1}; training stopped, the last good checkpoint is kept (try a lower lr, "
                "train.grad_clip or precision 32)")
        live = [v for v in losses.values() if v.requires_grad]
        if not live:  # a game that stepped everything itself
            return None
        name = distiller.main_optimizer
        if name is None:
            raise RuntimeError(f"{type(distiller).__name__} returned losses with grad but has no main_optimizer; "
                               "detach them or name the optimiser the Trainer should step")
        return self._optimizer_step(self.opts[name], sum(live))

    def _optimizer_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, *,
                        retain_graph: bool = False) -> torch.Tensor:
        """zero_grad, backward (outside autocast, scaled in fp16), clip, step: for the main optimiser and for
        the ones a method steps itself through `Distiller.optimizer_step`."""
        opt.zero_grad(set_to_none=True)  # also clears grads left on these parameters by other steps
        with torch.autocast(self.device.type, enabled=False):
            if self.scaler is not None:
                self.scaler.scale(loss).backward(retain_graph=retain_graph)
                self._average_gradients(opt)
                if self.cfg.grad_clip:
                    self.scaler.unscale_(opt)
                    self._clip(opt)
                self.scaler.step(opt)
            else:
                loss.backward(retain_graph=retain_graph)
                self._average_gradients(opt)
                if self.cfg.grad_clip:
                    self._clip(opt)
                opt.step()
        return loss.detach()

    def _average_gradients(self, opt: torch.optim.Optimizer) -> None:
        if self.dist.enabled:  # data parallel: the global batch's gradient (kdforge/engine/distributed.py)
            distributed.average_gradients((p for g in opt.param_groups for p in g["params"]), self.dist.world_size)

    def _rank_mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return distributed.mean_over_ranks(values, self.dist.world_size) if self.dist.enabled else values

    def _clip(self, opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not math.isfinite(float(norm)):
            raise NonFiniteLossError(f"gradient norm is {float(norm)} at step {self.pos['step'] + 1}; training "
                                     "stopped, last good checkpoint kept")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, distiller, loader: Iterable) -> dict[str, Any]:
        was_training = distiller.training
        distiller.eval()
        try:
            predict = distiller.predict
            reference = distiller.teacher_predict if distiller.teacher is not None else None
            if distributed.current().enabled:  # the model runs on each rank's block of a batch, outputs gathered
                predict = distributed.gathered(predict)
                reference = distributed.gathered(reference) if reference is not None else None
            with self._autocast():
                return self.evaluator(predict, loader, self.device, reference=reference,
                                      to_batch=lambda b, d: to_batch(b, d, self.cfg.channels_last))
        finally:
            distiller.train(was_training)

    def _monitored(self, metrics: dict[str, Any]) -> float:
        if self.monitor not in metrics:
            raise ValueError(f"monitor metric {self.monitor!r} is not among the evaluator's metrics "
                           f"{sorted(metrics)}; set eval.monitor to one of them")
        return float(metrics[self.monitor])

    def _best(self) -> dict[str, Any] | None:
        key = f"val_{self.monitor}"
        seen = [(h[key], h["epoch"]) for h in self.history if isinstance(h.get(key), (int, float))]
        if not seen:
            return None
        value, epoch = (max if self.mode == "max" else min)(seen, key=lambda p: p[0])
        return {"metric": self.monitor, "mode": self.mode, "value": value, "epoch": epoch}

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        dtype = PRECISIONS[str(self.cfg.precision)]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _batches(self, loader: Iterable, epoch: int, start: int) -> Iterator:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if start and hasattr(loader, "iter_from"):
            return loader.iter_from(start)
        if start:  # replay a plain iterable from the epoch's RNG state and skip what was done
            resume_state = torch.get_rng_state()
            torch.set_rng_state(self.epoch_rng)
            it = iter(loader)
            for _ in range(start):
                next(it)
            torch.set_rng_state(resume_state)
            return it
        return iter(loader)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, distiller, position: dict[str, int], *, mid_epoch: bool) -> None:
        try:  # never keep a checkpoint that a later eval would score as if it were a model
            assert_finite_state(distiller.state_for_checkpoint(), f"the {type(distiller).__name__} run")
        except NonFiniteStateError as e:
            raise NonFiniteStateError(f"{e} after step {self.pos['step']}; training stopped, the last good "
                                      "checkpoint is kept (try a lower lr, train.grad_clip or precision 32)") from None
        if self.run_dir is None or not self.writes:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": distiller.student.state_dict(),
            "networks": {k: m.state_dict() for k, m in distiller.networks().items()},
            "distiller": distiller.state_for_checkpoint(),
            "optimizers": {k: o.state_dict() for k, o in self.opts.items()},
            "schedulers": {k: s.state_dict() for k, s in self.scheds.items() if s is not None},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "position": position,
            "rng": rng_state(),
            "epoch_rng": self.epoch_rng if mid_epoch else None,
            "epoch_sums": {k: float(v) for k, v in self.sums.items()} if mid_epoch else {},
            "epoch_batches": self.n_done if mid_epoch else 0,
            "history": self.history,
            "config": self.config_dict,
        }
        save_checkpoint(state, self.run_dir / "checkpoints" / "last.pt", check_finite=False)  # checked above

    def _restore(self, distiller, resume: bool | str | Path) -> dict[str, Any]:
        path = Path(resume) if not isinstance(resume, bool) else Path(self.run_dir or ".") / "checkpoints/last.pt"
        ckpt = load_checkpoint_with_fallback(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a kdforge training checkpoint (format {ckpt.get('format')!r})")
        distiller.load_from_checkpoint(ckpt["distiller"])
        self.pos, self.history = dict(ckpt["position"]), list(ckpt["history"])
        self.logger.truncate_after(self.pos["step"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        distiller.global_step = self.pos["step"]
        return ckpt
