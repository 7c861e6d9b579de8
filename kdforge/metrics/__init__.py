"""Streaming metrics (accuracy, confusion matrix, per-group accuracy); fairness and image metrics later."""
from kdforge.metrics.classification import Accuracy, ConfusionMatrix, GroupAccuracy, evaluate_classifier

__all__ = ["Accuracy", "ConfusionMatrix", "GroupAccuracy", "evaluate_classifier"]
