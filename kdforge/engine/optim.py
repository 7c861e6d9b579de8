"""Optimisers and learning-rate schedules from a TrainConfig-like object.

Schedules are per step (LambdaLR), so a run resumed mid-epoch continues on the exact LR curve; the
plateau schedule is the exception and steps once per evaluation on the validation loss.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from kdforge.registry import did_you_mean

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "multistep", "constant", "plateau")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any, *,
                    lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov), Adam or AdamW with the config's lr and weight decay."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to optimise")
    name = cfg.optimizer.lower()
    lr = cfg.lr if lr is None else lr
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}{did_you_mean(name, OPTIMIZERS)}")


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: Any) -> float:
    """The multiplier of the base LR at optimiser step `step` (0-based)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:  # linear warm-up from 1% of the base LR
        return 0.01 + 0.99 * step / max(1, warm)
    name = cfg.schedule.lower()
    if name == "constant" or name == "plateau":
        return 1.0
    if name == "cosine":
        span = max(1, total_steps - warm)
        t = min(1.0, (step - warm) / span)
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if name == "multistep":
        epochs_total = total_steps / max(1, steps_per_epoch)
        # milestones < 1 are fractions of the run, others are epoch numbers
        bounds = [m * epochs_total if m < 1 else m for m in cfg.milestones]
        epoch = step / max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= b for b in bounds)
    raise ValueError(f"unknown schedule {cfg.schedule!r}{did_you_mean(name, SCHEDULES)}")


def build_scheduler(opt: torch.optim.Optimizer, cfg: Any, total_steps: int, steps_per_epoch: int, *,
                    mode: str = "min"):
    """A per-step LambdaLR, or ReduceLROnPlateau (stepped by the Trainer after each evaluation on the
    monitored metric; `mode` "max" when higher is better)."""
    if cfg.schedule.lower() == "plateau":
        if cfg.warmup_epochs:
            raise ValueError("train.warmup_epochs cannot be combined with schedule 'plateau'")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.gamma,
                                                          patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    lr_factor(0, total_steps, steps_per_epoch, cfg)  # validate the name now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg))
