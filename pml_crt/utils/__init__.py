"""Helpers shared across pml-crt (imported on first access: faiss loads only when used)."""

from .._lazy import lazy_package

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

lazy_package(
    __name__,
    submodules=("distributed", "validation"),
    attributes={
        "AnalysisAccuracyCalculator": "analysis_metrics",
        "embedding_density": "analysis_metrics",
        "faiss_available": "accuracy",
        "make_accuracy_calculator": "accuracy",
        "make_knn_func": "accuracy",
        "spectral_decay": "analysis_metrics",
    },
)
