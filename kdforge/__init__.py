"""kdforge: knowledge distillation recipes you can run, trust, compare and extend.

The Python API (`distill`, `train`, `evaluate`, `run_recipe`, `demo`; `export` and `bench` for deployment;
`anonymize_folder` and `deanonymize_folder` for reversible face anonymisation with a flow)
takes plain nn.Modules and loaders; the `kdforge` command is a thin layer over it.
"""
from kdforge import data, distillers, losses, metrics, models  # noqa: F401  (registers everything)
from kdforge.api import DistillResult, distill, evaluate, load_student, train
from kdforge.config import RunConfig, TrainConfig, load_config
from kdforge.distillers.base import Distiller, FeatureTaps, Stage
from kdforge.recipe import run_recipe
from kdforge.registry import DATASETS, DISTILLERS, EVALUATORS, LOSSES, METRICS, MODELS

__version__ = "0.1.0"

# deployment (kdforge.deploy) is imported on first use: `import kdforge` stays free of onnx and its friends
_LAZY = {"export": "kdforge.deploy.export", "ExportResult": "kdforge.deploy.export",
         "ExportError": "kdforge.deploy.diagnose", "bench": "kdforge.deploy.bench",
         "BenchResult": "kdforge.deploy.bench",
         # anonymisation of image folders (kdforge.privacy.folder): imported on first use like deployment
         "anonymize_folder": "kdforge.privacy.folder", "deanonymize_folder": "kdforge.privacy.folder"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdforge' has no attribute {name!r}")


__all__ = [
    "DATASETS", "DISTILLERS", "EVALUATORS", "LOSSES", "METRICS", "MODELS", "BenchResult", "DistillResult", "Distiller",
    "ExportError", "ExportResult", "FeatureTaps", "RunConfig", "Stage", "TrainConfig", "anonymize_folder", "bench",
    "deanonymize_folder", "distill", "evaluate", "export", "load_config", "load_student", "run_recipe", "train",
]
