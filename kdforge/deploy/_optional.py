"""The optional packages of `kdforge[export]`, imported when a function needs them, with an error that says how
to install them (so `import kdforge` never pulls in onnx)."""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = "pip install 'kdforge[export]'"


def require(module: str, why: str) -> ModuleType:
    """`module` imported, or an ImportError naming what needed it and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{why} needs the package {top!r}, which is not installed: {INSTALL}") from e
