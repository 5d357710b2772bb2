"""Evaluation: pure functions over feature tensors."""

from .features import extract_features
from .knn import knn_accuracy, knn_predict, knn_scores

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "knn_scores"]
