"""One generic name -> factory registry, used for models, distillers, datasets, losses and metrics.

Adding a method or a model is one decorated definition; nothing else has to change. Lookups of
unknown names fail with the closest registered names, so a typo in a recipe is a one-line fix.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class RegistryError(KeyError):
    """An unknown name was looked up; the message names it and suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' did you mean 'x'?' for the closest of `choices`, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry:
    """A named table of factories (classes or functions).

    >>> MODELS = Registry("model")
    >>> @MODELS.register("tiny")
    ... def tiny(num_classes=10): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        # Resolvers handle names with a prefix ("torchvision:resnet18") that are not stored here.
        self._resolvers: dict[str, Callable[[str], Callable[..., Any]]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def add_resolver(self, prefix: str, resolve: Callable[[str], Callable[..., Any]]) -> None:
        """Names written `prefix:rest` are resolved by `resolve(rest)` (e.g. torchvision, timm)."""
        self._resolvers[prefix] = resolve

    def get(self, name: str) -> Callable[..., Any]:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            prefix, rest = name.split(":", 1)
            if prefix in self._resolvers:
                return self._resolvers[prefix](rest)
            if "." in prefix or prefix.isidentifier():  # a user factory 'pkg.mod:fn'
                return import_factory(name, kind=self.kind)
        raise RegistryError(
            f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}"
            f" (registered: {', '.join(self.names())})"
        )

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_factory(spec: str, kind: str = "model") -> Callable[..., Any]:
    """The callable named by ``spec`` = ``"pkg.mod:attr"`` or ``"pkg.mod:attr.sub"``, imported on demand.

    Lets a recipe use a model (or dataset, loss, ...) defined in the user's own code without registering it.
    Errors name the spec: a module that cannot be imported re-raises ``ModuleNotFoundError``; a missing
    attribute raises ``RegistryError`` with the closest public names of the module (or object) searched.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"{kind} spec {spec!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"cannot import module {module_name!r} for {kind} {spec!r}: {e}"
            " (is it installed, or its folder on sys.path / PYTHONPATH?)",
            name=e.name,
        ) from e
    where = module_name  # what has been resolved so far, for the error message
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise RegistryError(
                f"{kind} {spec!r}: {where!r} has no attribute {part!r}{did_you_mean(part, public)}"
            )
        obj = getattr(obj, part)
        where += (":" if i == 0 else ".") + part
    if not callable(obj):
        raise TypeError(f"{kind} {spec!r} is a {type(obj).__name__}, not a callable factory")
    return obj


MODELS = Registry("model")
DISTILLERS = Registry("distiller")
DATASETS = Registry("dataset")
LOSSES = Registry("loss")
METRICS = Registry("metric")
EVALUATORS = Registry("evaluator")
