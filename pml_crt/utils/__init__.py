"""Helpers shared across pml-crt (imported on first access: faiss loads only when used).

- ``accuracy``, ``analysis_metrics``: PML ``AccuracyCalculator`` set-ups and
  the analysis metrics (embedding density, spectral decay);
- ``distributed``: DDP helpers (rank sharding, all-gather wrappers);
- ``layout``: tensor layouts (trunk outputs to tokens, splitting heads);
- ``optim``: :func:`param_groups`, optimizer parameter groups that give a
  CRT fusion built with ``scale_fusion_step`` its own learning rate;
- ``validation``: argument and input checks;
- ``stats``: mean and 95% confidence interval over seeds, for tables of
  results.

The similarity-consistency term is :mod:`pml_crt.consistency`
(``pml_crt.utils.consistency`` is a deprecated alias).
"""

from .._lazy import lazy_package

__all__ = [
    "AnalysisAccuracyCalculator",
    "distributed",
    "embedding_density",
    "faiss_available",
    "layout",
    "make_accuracy_calculator",
    "make_knn_func",
    "param_groups",
    "spectral_decay",
    "validation",
]

lazy_package(
    __name__,
    submodules=("distributed", "layout", "validation"),
    attributes={
        "AnalysisAccuracyCalculator": "analysis_metrics",
        "embedding_density": "analysis_metrics",
        "faiss_available": "accuracy",
        "make_accuracy_calculator": "accuracy",
        "make_knn_func": "accuracy",
        "param_groups": "optim",
        "spectral_decay": "analysis_metrics",
    },
)
