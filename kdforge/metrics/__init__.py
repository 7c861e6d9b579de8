"""Streaming metrics (accuracy, confusion matrix, per-group accuracy, group fairness) and the evaluators runs are
scored by (classification, groups, images, fairness, generation, flow)."""
from kdforge.metrics.classification import Accuracy, ConfusionMatrix, GroupAccuracy, evaluate_classifier
from kdforge.metrics.evaluators import (
    ClassificationEvaluator,
    Evaluator,
    GroupEvaluator,
    ImageEvaluator,
    build_evaluator,
)
from kdforge.metrics.fairness import (  # importing it registers the "fairness" evaluator
    FairnessEvaluator,
    GroupConfusion,
    equal_opportunity_gaps,
    fairness_from_counts,
    group_class_accuracy,
)
from kdforge.metrics.flow import FlowEvaluator  # importing it registers the "flow" evaluator
from kdforge.metrics.generation import GenerationEvaluator  # importing it registers the "generation" evaluator

__all__ = ["Accuracy", "ClassificationEvaluator", "ConfusionMatrix", "Evaluator", "FairnessEvaluator",
           "FlowEvaluator", "GenerationEvaluator", "GroupAccuracy", "GroupConfusion", "GroupEvaluator",
           "ImageEvaluator",
           "build_evaluator", "equal_opportunity_gaps", "evaluate_classifier", "fairness_from_counts",
           "group_class_accuracy"]
