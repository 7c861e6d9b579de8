"""Streaming metrics (accuracy, confusion matrix, per-group accuracy) and the evaluators runs are scored by."""
from kdforge.metrics.classification import Accuracy, ConfusionMatrix, GroupAccuracy, evaluate_classifier
from kdforge.metrics.evaluators import (
    ClassificationEvaluator,
    Evaluator,
    GroupEvaluator,
    ImageEvaluator,
    build_evaluator,
)

__all__ = ["Accuracy", "ClassificationEvaluator", "ConfusionMatrix", "Evaluator", "GroupAccuracy", "GroupEvaluator",
           "ImageEvaluator", "build_evaluator", "evaluate_classifier"]
