"""An ``AccuracyCalculator`` that works with or without faiss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

MLRC_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
CLUSTERING_METRICS = {"NMI", "AMI"}


def labels_equal(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x == y``, PML's default label comparison, as a function of its own.

    PML's ``AccuracyCalculator`` counts every query label's matches in the
    reference set with one broadcast ``(num_classes, num_references)``
    comparison when ``label_comparison_fn`` is its own ``EQUALITY``, and
    ``torch.sum`` then casts it to int64: ``9 * num_classes * num_references``
    bytes, 24.5 GB for Stanford Online Products (22,634 classes, 120,053
    images), more than this machine's memory. With any other function it
    counts one class at a time in ``O(num_references)`` memory (about 4 s of
    CPU time and 28 MiB at SOP scale, measured on one thread); the metrics
    are identical.
    """
    return torch.eq(x, y)


def faiss_available() -> bool:
    """Whether faiss (faiss-gpu or faiss-cpu) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def make_knn_func(prefer_faiss: bool = True, batch_size: int | None = 4096) -> Any:
    """The k-NN search for an ``AccuracyCalculator``.

    Returns PML's ``FaissKNN`` when faiss is installed and ``prefer_faiss``;
    otherwise PML's ``CustomKNN`` with cosine similarity, computed in query
    blocks of ``batch_size`` rows so memory stays ``O(batch_size * N)``.
    """
    if prefer_faiss and faiss_available():
        from pytorch_metric_learning.utils.inference import FaissKNN

        return FaissKNN()
    return CustomKNN(CosineSimilarity(), batch_size=batch_size)


def make_accuracy_calculator(
    include: Sequence[str] = MLRC_METRICS,
    k: int | str | None = "max_bin_count",
    prefer_faiss: bool = True,
    batch_size: int | None = 4096,
    calculator_class: type[AccuracyCalculator] = AccuracyCalculator,
    **kwargs: Any,
) -> AccuracyCalculator:
    """Build ``calculator_class`` with a k-NN search that exists on this machine.

    Args:
        include: metric names (default: MLRC's P@1, R-Precision, MAP@R).
        k: neighbours to retrieve; ``"max_bin_count"`` is exact for
            R-Precision and MAP@R.
        prefer_faiss: use faiss when it is installed.
        batch_size: query block size of the faiss-free fallback.
        calculator_class: ``AccuracyCalculator`` or a subclass with more
            ``calculate_*`` metrics.
        **kwargs: passed to ``calculator_class``; ``label_comparison_fn``
            defaults to :func:`labels_equal` (PML's equality, counted per
            class so memory stays ``O(N)``) unless a clustering metric (NMI,
            AMI) is included, which PML computes only with its own equality.
    """
    knn_func = make_knn_func(prefer_faiss, batch_size)
    if not set(include) & CLUSTERING_METRICS:  # PML refuses custom comparisons with clustering
        kwargs.setdefault("label_comparison_fn", labels_equal)
    return calculator_class(include=tuple(include), k=k, knn_func=knn_func, **kwargs)
