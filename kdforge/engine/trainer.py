"""The training loop. It knows devices, precision, schedules, checkpoints and logging, and the Distiller
contract (kdforge.distillers.base); it never names a method.

Resume is exact: a checkpoint holds the models, optimisers, schedulers, grad scaler, RNG states, and the
position in the data order (stage, epoch, batches done). Loaders with `set_epoch` + `iter_from` (kdforge's
BatchLoader) jump straight to that batch; any other iterable is replayed from the RNG state saved at the
start of the epoch and the finished batches are skipped.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdforge.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from kdforge.engine.logging import MetricsLogger
from kdforge.engine.optim import build_scheduler
from kdforge.metrics.classification import evaluate_classifier

CHECKPOINT_FORMAT = "kdforge-checkpoint/1"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the term, the epoch and the step."""


@dataclass
class FitResult:
    metrics: dict[str, Any]  # the last evaluation (or last training losses when there is no val loader)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    run_dir: Path | None = None
    stopped_early: bool = False  # max_steps reached before the last epoch ended


@dataclass
class _Run:
    """What one `fit` call carries between its epochs (and into its checkpoints)."""

    distiller: Any
    logger: MetricsLogger
    scaler: Any
    pos: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "batch": 0, "step": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    opts: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    scheds: dict[str, Any] = field(default_factory=dict)
    epoch_rng: torch.Tensor | None = None
    sums: dict[str, Any] = field(default_factory=dict)
    n_done: int = 0
    t0: float = 0.0
    stage_idx: int = 0
    stage_end: int = 0  # the epoch at which the current stage ends


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_batch(raw: Any, device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move a batch to `device`. Dict batches pass through; (image, label[, extras]) tuples become dicts."""
    if isinstance(raw, dict):
        batch = dict(raw)
    elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
        batch = {"image": raw[0], "label": raw[1]}
        if len(raw) > 2 and isinstance(raw[2], dict):
            batch.update(raw[2])
        elif len(raw) > 2:
            batch["index"] = raw[2]
    else:
        raise TypeError(f"a batch must be a dict or an (image, label) tuple, got {type(raw).__name__}")
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and k == "image" and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            batch[k] = v
    return batch


class Trainer:
    """Runs a Distiller over a train loader; evaluates, logs and checkpoints into `run_dir`.

    `evaluator(distiller, loader, device) -> dict` defaults to classification accuracy of the student;
    methods whose student is not a classifier (generators, flows) pass their own.
    """

    def __init__(self, cfg: Any, run_dir: str | Path | None = None, *,
                 evaluator: Callable[..., dict[str, Any]] | None = None,
                 config_dict: dict[str, Any] | None = None,
                 monitor: str = "top1") -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.evaluator = evaluator or self._evaluate_classifier
        self.config_dict = config_dict or {}
        self.monitor = monitor

    # ------------------------------------------------------------------ evaluation
    def _evaluate_classifier(self, distiller, loader, device) -> dict[str, Any]:
        return evaluate_classifier(distiller.predict, loader, device,
                                   to_batch=lambda b, d: to_batch(b, d, self.cfg.channels_last),
                                   num_groups=getattr(loader, "num_groups", None))

    def evaluate(self, distiller, loader) -> dict[str, Any]:
        was_training = distiller.training
        distiller.eval()
        try:
            with self._autocast():
                return self.evaluator(distiller, loader, self.device)
        finally:
            distiller.train(was_training)

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        p = str(self.cfg.precision)
        if p in ("32", "fp32"):
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "16": torch.float16, "fp16": torch.float16}.get(p)
        if dtype is None:
            raise ValueError(f"unknown precision {p!r}; use 32, bf16 or 16")
        return torch.autocast(self.device.type, dtype=dtype)

    def _batches(self, loader: Iterable, epoch: int, start: int, epoch_rng: torch.Tensor | None) -> Iterator:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if start and hasattr(loader, "iter_from"):
            return loader.iter_from(start)
        if start:  # replay a plain iterable from the epoch's RNG state and skip what was done
            resume_state = torch.get_rng_state()
            if epoch_rng is not None:
                torch.set_rng_state(epoch_rng)
            it = iter(loader)
            for _ in range(start):
                next(it)
            torch.set_rng_state(resume_state)
            return it
        return iter(loader)

    def _save(self, run: _Run, position: dict[str, int], *, mid_epoch: bool) -> None:
        if self.run_dir is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": run.distiller.student.state_dict(),
            "distiller": run.distiller.state_for_checkpoint(),
            "optimizers": {k: o.state_dict() for k, o in run.opts.items()},
            "schedulers": {k: s.state_dict() for k, s in run.scheds.items()},
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "position": position,
            "rng": rng_state(),
            "epoch_rng": run.epoch_rng if mid_epoch else None,
            # the epoch's running loss sums, so a run resumed mid-epoch logs the same means as an unbroken one
            "epoch_sums": {k: float(v) for k, v in run.sums.items()} if mid_epoch else {},
            "epoch_batches": run.n_done if mid_epoch else 0,
            "history": run.history,
            "config": self.config_dict,
        }
        atomic_save(state, self.run_dir / "checkpoints" / "last.pt")

    # ------------------------------------------------------------------ the loop
    def fit(self, distiller, train_loader: Iterable, val_loader: Iterable | None = None,
            resume: bool | str | Path = False) -> FitResult:
        """Train through every stage of `distiller`; evaluate on `val_loader` after each epoch."""
        cfg = self.cfg
        distiller.to(self.device)
        if cfg.channels_last:
            distiller.to(memory_format=torch.channels_last)
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        if steps_per_epoch == 0:
            raise ValueError("the train loader yields no batches (dataset smaller than one batch with drop_last?)")
        stages = distiller.stages(cfg.epochs)
        use_scaler = str(cfg.precision) in ("16", "fp16") and self.device.type == "cuda"
        run = _Run(distiller, MetricsLogger(self.run_dir, cfg.tensorboard),
                   torch.amp.GradScaler("cuda") if use_scaler else None)
        ckpt = self._restore(run, resume) if resume else None
        ends = [sum(s.epochs for s in stages[: i + 1]) for i in range(len(stages))]
        # the stage follows from the epoch, so a resumed run may also be extended with more epochs
        first_stage = next((i for i, end in enumerate(ends) if run.pos["epoch"] < end), len(stages))

        for stage_idx in range(first_stage, len(stages)):
            stage, stage_begin = stages[stage_idx], ends[stage_idx] - stages[stage_idx].epochs
            distiller.set_stage(stage.name)
            run.stage_idx, run.stage_end = stage_idx, ends[stage_idx]
            stage_steps = stage.epochs * steps_per_epoch
            run.opts = distiller.configure_optimizers(stage.name, cfg, stage_steps)
            run.scheds = {k: build_scheduler(o, cfg, stage_steps, steps_per_epoch) for k, o in run.opts.items()}
            distiller.optimizers = run.opts
            if ckpt is not None:
                if run.pos["epoch"] > stage_begin or run.pos["batch"] > 0:  # else this stage has not begun
                    for k, o in run.opts.items():
                        o.load_state_dict(ckpt["optimizers"][k])
                    for k, sc in run.scheds.items():
                        sc.load_state_dict(ckpt["schedulers"][k])
                set_rng_state(ckpt["rng"])
            for epoch in range(max(run.pos["epoch"], stage_begin), ends[stage_idx]):
                start = run.pos["batch"] if (ckpt is not None and epoch == run.pos["epoch"]) else 0
                if not self._train_epoch(run, train_loader, stage.name, epoch, start, ckpt if start else None):
                    run.logger.close()
                    metrics = self.evaluate(distiller, val_loader) if val_loader is not None else {}
                    return FitResult(metrics, run.history, self.run_dir, stopped_early=True)
                self._end_epoch(run, stage.name, epoch, val_loader)
                ckpt = None
            ckpt = None
        run.logger.close()
        last = run.history[-1] if run.history else {}
        metrics = {k[4:]: v for k, v in last.items() if k.startswith("val_")} or last
        return FitResult(metrics=metrics, history=run.history, run_dir=self.run_dir)

    def _restore(self, run: _Run, resume: bool | str | Path) -> dict[str, Any]:
        path = Path(resume) if not isinstance(resume, bool) else Path(self.run_dir or ".") / "checkpoints/last.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{path} is not a kdforge training checkpoint (format {ckpt.get('format')!r})")
        run.distiller.load_from_checkpoint(ckpt["distiller"])
        run.pos, run.history = dict(ckpt["position"]), list(ckpt["history"])
        run.logger.truncate_after(run.pos["step"])
        if run.scaler is not None and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        run.distiller.global_step = run.pos["step"]
        return ckpt

    def _train_epoch(self, run: _Run, loader: Iterable, stage: str, epoch: int, start: int,
                     ckpt: dict[str, Any] | None) -> bool:
        """One epoch from batch `start`; False when max_steps ended the run before the epoch's end."""
        cfg, distiller = self.cfg, run.distiller
        run.epoch_rng = ckpt["epoch_rng"] if ckpt is not None else torch.get_rng_state()
        run.sums, run.n_done = {}, 0
        if ckpt is not None:  # float32 sums round-trip exactly through Python floats
            run.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                        for k, v in ckpt.get("epoch_sums", {}).items()}
            run.n_done = int(ckpt.get("epoch_batches", 0))
        main = next(iter(run.opts))
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
        distiller.train()
        run.t0 = time.perf_counter()
        bar = tqdm(self._batches(loader, epoch, start, run.epoch_rng), total=steps_per_epoch, initial=start,
                   disable=not cfg.progress, leave=False, desc=f"{stage} epoch {epoch + 1}/{cfg.epochs}")
        try:
            for batch_idx, raw in enumerate(bar, start=start):
                batch = to_batch(raw, self.device, cfg.channels_last)
                with self._autocast():
                    losses = distiller.training_step(batch)
                total = self._step(losses, run.opts[main], run.scaler, epoch, run.pos["step"])
                for sc in run.scheds.values():
                    if not isinstance(sc, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        sc.step()
                run.pos["step"] += 1
                distiller.global_step = run.pos["step"]
                for k, v in losses.items():
                    run.sums[k] = run.sums.get(k, 0.0) + v.detach().float()
                if total is not None:
                    run.sums["loss"] = run.sums.get("loss", 0.0) + total.detach().float()
                run.n_done += 1
                if cfg.log_every and run.pos["step"] % cfg.log_every == 0:
                    rec = {k: float(v) / run.n_done for k, v in run.sums.items()}
                    bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()})
                    run.logger.log({"kind": "step", "step": run.pos["step"], "epoch": epoch,
                                    "lr": run.opts[main].param_groups[0]["lr"], **rec})
                done = {"stage": run.stage_idx, "epoch": epoch, "batch": batch_idx + 1, "step": run.pos["step"]}
                if cfg.checkpoint_every and run.pos["step"] % cfg.checkpoint_every == 0:
                    self._save(run, done, mid_epoch=True)
                if cfg.max_steps is not None and run.pos["step"] >= cfg.max_steps:
                    if batch_idx + 1 < steps_per_epoch or epoch + 1 < cfg.epochs:
                        self._save(run, done, mid_epoch=True)
                        return False
        finally:
            bar.close()
        return True

    def _end_epoch(self, run: _Run, stage: str, epoch: int, val_loader: Iterable | None) -> None:
        """Evaluate, log the epoch record and checkpoint at the start of the next epoch."""
        cfg = self.cfg
        main = run.opts[next(iter(run.opts))]
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": run.pos["step"], "stage": stage,
                                  "lr": main.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - run.t0}
        record.update({f"train_{k}": float(v) / max(1, run.n_done) for k, v in run.sums.items()})
        if val_loader is not None and ((epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs):
            metrics = self.evaluate(run.distiller, val_loader)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            for sc in run.scheds.values():
                if isinstance(sc, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sc.step(metrics["loss"])
        run.history.append(record)
        run.logger.log(record)
        run.pos.update(epoch=epoch + 1, batch=0, stage=run.stage_idx + (epoch + 1 == run.stage_end))
        self._save(run, dict(run.pos), mid_epoch=False)

    def _step(self, losses: dict[str, torch.Tensor], opt: torch.optim.Optimizer, scaler, epoch: int,
              step: int) -> torch.Tensor | None:
        """Backpropagate the sum of the grad-carrying terms and step the main optimiser."""
        if not isinstance(losses, dict) or not losses:
            raise TypeError("training_step must return a non-empty dict of named losses")
        live = {k: v for k, v in losses.items() if v.requires_grad}
        terms = torch.stack([v.detach().float().sum() for v in losses.values()])
        if not bool(torch.isfinite(terms).all()):  # one device sync a step; name the culprit only on failure
            k, v = next((k, v) for k, v in losses.items() if not torch.isfinite(v.detach()).all())
            raise NonFiniteLossError(
                    f"loss term {k!r} is {float(v.detach())} at epoch {epoch + 1}, step {step + 1}; training stopped, "
                    f"the last good checkpoint is kept (try a lower lr, train.grad_clip or precision 32)")
        if not live:  # a game that stepped everything itself
            return None
        total = sum(live.values())
        opt.zero_grad(set_to_none=True)  # also clears grads left on the student by inner game steps
        if scaler is not None:
            scaler.scale(total).backward()
            if self.cfg.grad_clip:
                scaler.unscale_(opt)
                self._clip(opt)
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            if self.cfg.grad_clip:
                self._clip(opt)
            opt.step()
        return total

    def _clip(self, opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not math.isfinite(float(norm)):
            raise NonFiniteLossError(f"gradient norm is {float(norm)}; training stopped, last good checkpoint kept")
