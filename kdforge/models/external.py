"""Models kdforge does not define: torchvision and timm by name, and user factories by import path.

All three go through ``MODELS.get`` so a recipe names any model the same way:

- ``torchvision:<name>`` (e.g. ``torchvision:mobilenet_v3_small``): torchvision's builder, called with the
  recipe's keyword arguments (``num_classes`` passes straight through). No weights unless the caller passes
  ``weights=...``: nothing is downloaded by default.
- ``timm:<name>``: ``timm.create_model(name, pretrained=False, **kw)``; timm is an optional dependency.
- ``pkg.mod:attr`` (or ``pkg.mod:attr.sub``): any importable callable; the registry sends names with a ':'
  whose prefix is not a resolver here (see :func:`import_factory`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from kdforge.registry import MODELS, RegistryError, did_you_mean, import_factory  # noqa: F401


def resolve_torchvision(name: str) -> Callable[..., nn.Module]:
    """The torchvision builder for ``name``; it is called without weights unless ``weights=`` is given."""
    import torchvision.models as tvm

    if name not in tvm.list_models():
        classification = tvm.list_models(module=tvm)
        raise RegistryError(
            f"unknown torchvision model {name!r}{did_you_mean(name, classification)}"
            f" (see torchvision.models.list_models())"
        )
    builder = tvm.get_model_builder(name)

    @functools.wraps(builder)
    def factory(**kw: Any) -> nn.Module:
        kw.setdefault("weights", None)  # explicit: never fetch weights behind the user's back
        return builder(**kw)

    return factory


def resolve_timm(name: str) -> Callable[..., nn.Module]:
    """A factory calling ``timm.create_model(name, pretrained=False, **kw)``; needs ``pip install timm``."""
    try:
        timm = importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            f"model 'timm:{name}' needs the optional package timm, which is not installed:"
            " pip install timm (or pip install kdforge[timm])"
        ) from e

    def factory(**kw: Any) -> nn.Module:
        kw.setdefault("pretrained", False)
        try:
            return timm.create_model(name, **kw)
        except RuntimeError as e:
            if "unknown model" not in str(e).lower():
                raise
            known = list(timm.list_models()) if hasattr(timm, "list_models") else []
            raise RegistryError(f"unknown timm model {name!r}{did_you_mean(name, known)}") from e

    factory.__name__ = f"timm_{name}"
    factory.__doc__ = f"timm.create_model({name!r}, pretrained=False, **kw)"
    return factory


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """``MODELS.get(name)(**kwargs)``, checked to be an ``nn.Module``; any name MODELS resolves works."""
    model = MODELS.get(name)(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


MODELS.add_resolver("torchvision", resolve_torchvision)
MODELS.add_resolver("timm", resolve_timm)
