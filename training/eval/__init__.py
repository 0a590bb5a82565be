"""Evaluation on frozen features: k-NN (cosine, T = 0.07) and the linear-probe grid (recipe section 8)."""

from training.eval.features import FeatureSet, eval_transform, extract_features
from training.eval.knn import knn_accuracy, knn_classify
from training.eval.linear import GridRow, ProbeResult, linear_probe

__all__ = [
    "FeatureSet",
    "GridRow",
    "ProbeResult",
    "eval_transform",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
]
