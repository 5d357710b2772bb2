"""Evaluation: pure functions over feature tensors (knn, retrieval, linear, kmeans), feature extraction, and the
choice of protocol (protocol.py)."""

from .features import extract_features, sharded_features
from .knn import knn_accuracy, knn_predict, knn_scores

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "knn_scores", "sharded_features"]
