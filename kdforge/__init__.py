"""kdforge: knowledge distillation recipes you can run, trust, compare and extend.

The Python API (`distill`, `train`, `evaluate`, `run_recipe`, `demo`) takes plain nn.Modules and
loaders; the `kdforge` command is a thin layer over it.
"""
from kdforge import data, distillers, losses, metrics, models  # noqa: F401  (registers everything)
from kdforge.api import DistillResult, distill, evaluate, load_student, train
from kdforge.config import RunConfig, TrainConfig, load_config
from kdforge.distillers.base import Distiller, FeatureTaps, Stage
from kdforge.recipe import run_recipe
from kdforge.registry import DATASETS, DISTILLERS, EVALUATORS, LOSSES, METRICS, MODELS

__version__ = "0.1.0"

__all__ = [
    "DATASETS", "DISTILLERS", "EVALUATORS", "LOSSES", "METRICS", "MODELS", "DistillResult", "Distiller", "FeatureTaps",
    "RunConfig", "Stage", "TrainConfig", "distill", "evaluate", "load_config", "load_student", "run_recipe",
    "train",
]
