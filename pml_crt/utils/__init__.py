"""Helpers shared across pml-crt."""

from . import distributed, validation
from .accuracy import faiss_available, make_accuracy_calculator, make_knn_func
from .analysis_metrics import AnalysisAccuracyCalculator, embedding_density, spectral_decay

__all__ = [
    "AnalysisAccuracyCalculator",
    "distributed",
    "embedding_density",
    "faiss_available",
    "make_accuracy_calculator",
    "make_knn_func",
    "spectral_decay",
    "validation",
]
