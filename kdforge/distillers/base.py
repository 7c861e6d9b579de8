"""The Distiller contract: a method is a module that owns a student, a frozen teacher and its extras.

The Trainer only ever calls:
  - `stages(total_epochs)`   -> the method's training stages (FitNet: hint then KD); one by default;
  - `configure_optimizers(stage, cfg, steps)` -> named optimisers; the first is stepped by the Trainer on
    the sum of the losses returned by `training_step`; methods that are games (MosaicKD, VEM, adversarial
    debiasing) step the others themselves inside `training_step` and return their losses detached;
  - `training_step(batch)` -> dict of named losses. Terms that require grad are summed and backpropagated;
    detached terms are only logged;
  - `student` for evaluation and export.
Intermediate features are taken by module name with forward hooks (`FeatureTaps`), so any model works.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdforge.engine.optim import build_optimizer
from kdforge.registry import RegistryError, did_you_mean

Batch = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """A phase of training with its own losses and fresh optimisers (FitNet's hint stage, flow Alg. 1)."""

    name: str
    epochs: int


def last_linear(model: nn.Module) -> str:
    """Module path of the last nn.Linear (the classifier head) in registration order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head; name the feature module explicitly")
    return names[-1]


class FeatureTaps:
    """Forward hooks that keep the outputs of named submodules from the latest forward pass.

    `FeatureTaps(model, ["layer2", "layer3"])`, then after `model(x)`, `taps["layer3"]` is that output.
    A name ending in `:in` keeps the module's input instead (`linear:in` is the pooled penultimate feature);
    `auto:in` means the input of the last nn.Linear. Names are checked up front; an unknown one fails
    naming the closest module paths.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, role: str = "model") -> None:
        self.names = list(names)
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            path, _, side = name.partition(":")
            if path == "auto":
                path = last_linear(model)
            if path not in modules or path == "" or side not in ("", "in", "out"):
                choices = [n for n in modules if n]
                raise RegistryError(f"unknown feature module {name!r} in {role} "
                                    f"({type(model).__name__}){did_you_mean(path, choices)}")
            self._handles.append(modules[path].register_forward_hook(self._keeper(name, side == "in")))

    def _keeper(self, name: str, keep_input: bool):
        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            value = inputs if keep_input else output
            self.outputs[name] = value[0] if isinstance(value, (tuple, list)) else value

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise RuntimeError(f"feature {name!r} was not produced by the last forward pass")
        return self.outputs[name]

    def take(self) -> list[torch.Tensor]:
        """The tapped features in the order they were named."""
        return [self[n] for n in self.names]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class TeacherCache:
    """Teacher outputs kept by dataset index, so a deterministic input is run through the teacher once.

    Correct only when the teacher sees the same tensor for an index every epoch (no random augmentation on
    its side); `kdforge.api` refuses to turn it on for a loader that reports random augmentation.
    Stored on the CPU in the dtype produced; memory is len(dataset) x output size per entry.
    """

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.filled: torch.Tensor | None = None

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if self.filled is None or int(index.max()) >= len(self.filled):
            return None
        if not bool(self.filled[index.cpu()].all()):
            return None
        return {k: v[index.cpu()] for k, v in self.store.items()}

    def insert(self, index: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        idx = index.cpu()
        need = int(idx.max()) + 1
        if self.filled is None or need > len(self.filled):
            size = max(need, 2 * (0 if self.filled is None else len(self.filled)))
            self._grow(size, outputs)
        for k, v in outputs.items():
            self.store[k][idx] = v.detach().to("cpu")
        self.filled[idx] = True

    def _grow(self, size: int, outputs: dict[str, torch.Tensor]) -> None:
        old = self.filled
        self.filled = torch.zeros(size, dtype=torch.bool)
        if old is not None:
            self.filled[: len(old)] = old
        for k, v in outputs.items():
            new = torch.zeros((size, *v.shape[1:]), dtype=v.dtype)
            if k in self.store:
                new[: len(self.store[k])] = self.store[k]
            self.store[k] = new


class Distiller(nn.Module):
    """Base class of every method. Subclasses set `teacher_features` / `student_features` (module
    names) when they need intermediate outputs, and implement `training_step`."""

    teacher_features: tuple[str, ...] = ()
    student_features: tuple[str, ...] = ()
    needs_teacher: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher model")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher_cache: TeacherCache | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.stage = "main"
        self.global_step = 0
        self._s_taps = FeatureTaps(student, self.student_features, role="student") if self.student_features else None
        self._t_taps = (FeatureTaps(teacher, self.teacher_features, role="teacher")
                        if teacher is not None and self.teacher_features else None)

    # ------------------------------------------------------------------ contract used by the Trainer
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a frozen teacher never updates its BN statistics
        return self

    def stages(self, total_epochs: int) -> list[Stage]:
        return [Stage("main", total_epochs)]

    def set_stage(self, name: str) -> None:
        self.stage = name

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the main optimiser trains: the student and any extras (regressors, embedders)."""
        return {n: m for n, m in self.named_children() if n != "teacher"}

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, torch.optim.Optimizer]:
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return {"main": build_optimizer(params, cfg)}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.student(batch["image"])

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen teacher (rebuilt from its own weights on resume)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match {type(self).__name__}: missing {missing[:10]}, "
                               f"unexpected {unexpected[:10]}")

    # ------------------------------------------------------------------ helpers for methods
    def run_student(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Student logits and the features named in `student_features`."""
        logits = self.student(x)
        return logits, (self._s_taps.take() if self._s_taps else [])

    def run_teacher(self, batch: Batch, x: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and `teacher_features`, under no_grad, from the cache when it is on."""
        assert self.teacher is not None
        x = batch["image"] if x is None else x
        cache = self.teacher_cache if x is batch["image"] and "index" in batch else None
        if cache is not None:
            hit = cache.lookup(batch["index"])
            if hit is not None:
                dev = x.device
                return hit["logits"].to(dev), [hit[f"f{i}"].to(dev) for i in range(len(self.teacher_features))]
        with torch.no_grad():
            logits = self.teacher(x)
            feats = self._t_taps.take() if self._t_taps else []
        if cache is not None:
            cache.insert(batch["index"], {"logits": logits, **{f"f{i}": f for i, f in enumerate(feats)}})
        return logits, feats

    @torch.no_grad()
    def feature_shapes(self, input_shape: tuple[int, ...]) -> tuple[list[torch.Size], list[torch.Size]]:
        """Shapes of the tapped student and teacher features for one input of `input_shape` (C, H, W).

        Runs both models once in eval mode on zeros: no BN statistic or RNG is touched, so building a
        method's extra modules (regressors, embedders) never changes a run's randomness.
        """
        x = torch.zeros(2, *input_shape)
        s_mode = self.student.training
        self.student.eval()
        try:
            self.student(x)
            s = [f.shape for f in self._s_taps.take()] if self._s_taps else []
        finally:
            self.student.train(s_mode)
        t: list[torch.Size] = []
        if self.teacher is not None and self._t_taps:
            self.teacher(x)
            t = [f.shape for f in self._t_taps.take()]
        return s, t

    def enable_teacher_cache(self) -> None:
        self.teacher_cache = TeacherCache()
