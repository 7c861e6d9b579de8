"""The Distiller contract: a method is a module that owns a student, a frozen teacher and its extras.

The Trainer only ever calls:
  - `stages(total_epochs)` -> the method's training stages (FitNet: hint then KD; a flow: encoder then
    decoder with the encoder frozen); one by default;
  - `configure_optimizers(stage, cfg, steps)` -> optimisers by name, each with its own schedule or none;
    the one named by `main_optimizer` is stepped by the Trainer on the sum of the grad-carrying losses
    returned by `training_step`. Games (MosaicKD, VEM, adversarial debiasing) step the others inside
    `training_step` with `optimizer_step(name, loss)`, which the Trainer backs with its precision, grad
    scaler and clipping, and return those losses detached (logged only);
  - `training_step(batch)` -> dict of named losses;
  - `networks()` -> the trained networks by name, for checkpoints, evaluation, reports and export;
    `predict(batch)` is what the evaluator scores;
  - `epoch_snapshot()` -> images and values to keep at each epoch's end (a generator's samples).
Intermediate features are taken by module name with forward hooks (`FeatureTaps`), so any model works.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
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
    frozen: tuple[str, ...] = ()  # networks (attribute paths: "decoder", "student.decoder") frozen, in eval, this stage


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


def flatten_tensors(tree: Any) -> tuple[list[torch.Tensor], Any]:
    """Split a tensor, or a tuple/list/dict nesting of them, into its tensors and a spec to rebuild it."""
    if isinstance(tree, torch.Tensor):
        return [tree], None
    if isinstance(tree, (tuple, list)):
        leaves, specs = [], []
        for item in tree:
            sub, spec = flatten_tensors(item)
            leaves += sub
            specs.append((len(sub), spec))
        return leaves, (type(tree), specs)
    if isinstance(tree, dict):
        leaves, specs = flatten_tensors(list(tree.values()))
        return leaves, (dict, list(tree.keys()), specs)
    raise TypeError(f"teacher outputs must be tensors or tuples/lists/dicts of tensors, got {type(tree).__name__}")


def unflatten_tensors(leaves: list[torch.Tensor], spec: Any) -> Any:
    """The inverse of `flatten_tensors`."""
    if spec is None:
        return leaves[0]
    if spec[0] is dict:
        return dict(zip(spec[1], unflatten_tensors(leaves, spec[2])))
    kind, parts = spec
    out, at = [], 0
    for n, sub in parts:
        out.append(unflatten_tensors(leaves[at:at + n], sub))
        at += n
    return kind(out) if kind is tuple else out


class TeacherCache:
    """Teacher outputs kept by dataset index, so a deterministic input is run through the teacher once.

    Outputs may be any nesting of tuples, lists and dicts of tensors whose first dimension is the batch
    (logits; a flow's latents; tapped features). Correct only when the teacher sees the same tensor for an
    index every epoch; `kdforge.distill` refuses to turn it on for a loader that reports random augmentation.
    Stored on the CPU in the dtype produced; memory is len(dataset) x output size.
    """

    def __init__(self) -> None:
        self.store: list[torch.Tensor] = []
        self.spec: Any = None
        self.filled: torch.Tensor | None = None

    def lookup(self, index: torch.Tensor) -> Any | None:
        """The cached outputs for `index` (same structure as inserted), or None unless all are cached."""
        idx = index.cpu()
        if self.filled is None or int(idx.max()) >= len(self.filled) or not bool(self.filled[idx].all()):
            return None
        return unflatten_tensors([v[idx] for v in self.store], self.spec)

    def insert(self, index: torch.Tensor, outputs: Any) -> None:
        idx = index.cpu()
        leaves, spec = flatten_tensors(outputs)
        if self.spec is not None and spec != self.spec:
            raise ValueError("teacher outputs changed structure between batches; the teacher cache needs a fixed one")
        for v in leaves:
            if v.dim() == 0 or v.shape[0] != len(idx):
                raise ValueError(f"every cached teacher output needs the batch as its first dim ({len(idx)}), "
                                 f"got shape {tuple(v.shape)}")
        self.spec = spec
        need = int(idx.max()) + 1
        if self.filled is None or need > len(self.filled):
            self._grow(max(need, 2 * (0 if self.filled is None else len(self.filled))), leaves)
        for store, v in zip(self.store, leaves):
            store[idx] = v.detach().to("cpu")
        self.filled[idx] = True

    def _grow(self, size: int, leaves: list[torch.Tensor]) -> None:
        old = self.filled
        self.filled = torch.zeros(size, dtype=torch.bool)
        if old is not None:
            self.filled[: len(old)] = old
        grown = []
        for i, v in enumerate(leaves):
            new = torch.zeros((size, *v.shape[1:]), dtype=v.dtype)
            if i < len(self.store):
                new[: len(self.store[i])] = self.store[i]
            grown.append(new)
        self.store = grown


class Distiller(nn.Module):
    """Base class of every method. Subclasses set `teacher_features` / `student_features` (module
    names) when they need intermediate outputs, and implement `training_step`.

    What the Trainer sets before it calls the method: `optimizers` (this stage's, by name), `epoch`
    (0-based), `global_step`, `steps_per_epoch` and `stage`.
    """

    teacher_features: tuple[str, ...] = ()
    student_features: tuple[str, ...] = ()
    needs_teacher: bool = True
    #: a method that trains its network alone and ignores any teacher (scratch, and the GAN / flow training loops);
    #: `kdforge train` runs these as written, and a recipe run never builds their teacher. (AD and MFD-F need no
    #: teacher but use one when given: needs_teacher False, trains_alone False.)
    trains_alone: bool = False
    #: what the method's networks are: "classifier" (logits out) or "generator" (images out: GAN training and
    #: generator distillation), for tools and tests that only make sense for one kind
    model_kind: str = "classifier"
    #: True when `predict` already reports the teacher's own score (flow_kd's teacher encoder/decoder pairing), so a
    #: recipe run does not evaluate the teacher on its own
    predict_scores_teacher: bool = False
    #: the optimiser the Trainer steps on the sum of the grad-carrying losses of `training_step`; None when
    #: the method steps every optimiser itself with `optimizer_step` (then returned losses are only logged)
    main_optimizer: str | None = "main"

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
        self.epoch = 0
        self.global_step = 0
        self.steps_per_epoch = 0
        self._frozen: tuple[str, ...] = ()
        self._stepper: Callable[..., torch.Tensor] | None = None  # the Trainer's backward/step, when run by one
        self._s_taps = FeatureTaps(student, self.student_features, role="student") if self.student_features else None
        self._t_taps = (FeatureTaps(teacher, self.teacher_features, role="teacher")
                        if teacher is not None and self.teacher_features else None)

    # ------------------------------------------------------------------ contract used by the Trainer
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a frozen teacher never updates its BN statistics
        for name in self._frozen:  # nor does a network frozen in this stage
            self._module(name).eval()
        return self

    def stages(self, total_epochs: int) -> list[Stage]:
        return [Stage("main", total_epochs)]

    def set_stage(self, stage: Stage | str) -> None:
        """Enter a stage: networks it names in `frozen` stop training (no grad, eval mode) until it ends."""
        stage = stage if isinstance(stage, Stage) else Stage(stage, 0)
        for name in self._frozen:
            self._module(name).requires_grad_(True)
        unknown = [n for n in stage.frozen if not isinstance(self._module(n), nn.Module)]
        if unknown:
            raise ValueError(f"stage {stage.name!r} freezes {unknown}, which are not modules of "
                             f"{type(self).__name__}{did_you_mean(unknown[0], list(self.networks()))}")
        self.stage, self._frozen = stage.name, tuple(stage.frozen)
        for name in self._frozen:
            self._module(name).requires_grad_(False)
        self.train(self.training)

    def _module(self, path: str) -> nn.Module | None:
        """A submodule by attribute path ("decoder", or "student.decoder" inside a bundled student), else None."""
        try:
            return self.get_submodule(path)
        except AttributeError:
            return None

    def networks(self) -> dict[str, nn.Module]:
        """The networks this method trains and hands back, by name: saved, loaded, evaluated, reported and
        exported under these names. A flow method returns {"encoder": ..., "decoder": ...}."""
        return {"student": self.student}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the main optimiser trains: the student and any extras (regressors, embedders)."""
        return {n: m for n, m in self.named_children() if n != "teacher" and n not in self._frozen}

    def configure_optimizers(self, stage: str, cfg: Any, steps: int) -> dict[str, Any]:
        """Optimisers by name. A value is an optimiser (given the recipe's schedule), or a pair
        (optimiser, schedule) where schedule is None (constant lr), a schedule name ("cosine", ...) or a
        per-step torch LR scheduler. `main_optimizer` names the one the Trainer steps."""
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return {"main": build_optimizer(params, cfg)}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Batch) -> Any:
        """What evaluators score: the student's output by default (logits, or images for a generator)."""
        return self.student(batch["image"])

    @torch.no_grad()
    def teacher_predict(self, batch: Batch) -> Any:
        """The teacher's output for the same batch, the reference of evaluators that need one."""
        assert self.teacher is not None
        return self.teacher(batch["image"])

    def unsaved_modules(self) -> tuple[str, ...]:
        """Submodules left out of checkpoints because they are rebuilt from their own weights files: the frozen
        teacher here; a method adds fixed feature networks (and drops a teacher it trains)."""
        return ("teacher",)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Everything but the `unsaved_modules` (the frozen teacher, rebuilt from its own weights on resume)."""
        skip = tuple(f"{m}." for m in self.unsaved_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(tuple(f"{m}." for m in self.unsaved_modules()))]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match {type(self).__name__}: missing {missing[:10]}, "
                               f"unexpected {unexpected[:10]}")

    # ------------------------------------------------------------------ helpers for methods
    def optimizer_step(self, name: str, loss: torch.Tensor, *, retain_graph: bool = False) -> torch.Tensor:
        """Zero optimiser `name`'s grads, backpropagate `loss`, clip and step, the way the Trainer steps its
        own: outside autocast, with its grad scaler and `grad_clip`. For games (a generator, a critic)."""
        if name not in self.optimizers:
            raise KeyError(f"{type(self).__name__} has no optimizer {name!r}{did_you_mean(name, list(self.optimizers))}"
                           f" (configure_optimizers returned {sorted(self.optimizers)})")
        if self._stepper is not None:
            return self._stepper(self.optimizers[name], loss, retain_graph=retain_graph)
        opt = self.optimizers[name]  # outside a Trainer: a plain step
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        opt.step()
        return loss.detach()

    def run_student(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Student logits and the features named in `student_features`."""
        logits = self.student(x)
        return logits, (self._s_taps.take() if self._s_taps else [])

    def run_teacher(self, batch: Batch, x: torch.Tensor | None = None, *,
                    grad: bool = False) -> tuple[Any, list[torch.Tensor]]:
        """Teacher output and `teacher_features` for `x` (default: the batch's images).

        The teacher stays frozen and in eval mode either way. By default it runs under no_grad and, when the
        cache is on and `x` is the batch's own images, from the cache. With `grad=True` the graph is kept so
        gradients reach `x` (a generator that learns from the teacher's response), never the teacher.
        """
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} was built without a teacher")
        x = batch["image"] if x is None else x
        cache = self.teacher_cache if not grad and x is batch.get("image") and "index" in batch else None
        if cache is not None:
            hit = cache.lookup(batch["index"])
            if hit is not None:
                out, feats = _to_device(hit, x.device)
                return out, list(feats)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = self.teacher(x)
            feats = self._t_taps.take() if self._t_taps else []
        if cache is not None:
            cache.insert(batch["index"], (out, tuple(feats)))
        return out, feats

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

    def train_sampler(self) -> Any | None:
        """A sampler the train loader should draw epochs with (e.g. group-and-class balanced), or None."""
        return None

    def epoch_snapshot(self) -> dict[str, Any]:
        """What the method shows of itself at the end of every epoch, by name: (N, C, H, W) tensors in [0, 1] are
        saved as image grids (run_dir/samples/<name>_epoch<E>.png, e.g. a generator's samples), anything else is
        logged in the epoch record. Must not draw from the global RNG (use fixed codes) or train anything."""
        return {}


def _to_device(tree: Any, device: torch.device) -> Any:
    leaves, spec = flatten_tensors(tree)
    return unflatten_tensors([v.to(device) for v in leaves], spec)
