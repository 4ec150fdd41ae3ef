"""Recall@K (CRT-paper style) as extra ``AccuracyCalculator`` metrics.

Recall@K in the deep-metric-learning papers that CRT compares with (and in the
CRT paper's tables) is the fraction of queries for which **at least one of the
K nearest neighbours** (the query itself excluded) has the query's label. It is
not PML's ``precision_at_k`` (the fraction of the K neighbours that match).
Recall@1 equals P@1.

:class:`BenchmarkAccuracyCalculator` adds ``recall_at_1``, ``recall_at_2``,
``recall_at_4`` and ``recall_at_8`` to PML's metrics and makes the k-NN search
return at least ``max(K)`` neighbours, also with ``k="max_bin_count"`` (whose
``k`` is the largest class size minus one, which can be below 8). Queries
whose class has no other member in the reference set are left out, as PML
does for P@1.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils.accuracy_calculator import (
    maybe_get_avg_of_avgs,
    nan_accuracy,
    try_getting_not_lone_labels,
)

from pml_crt.utils import AnalysisAccuracyCalculator

__all__ = ["RECALL_KS", "BenchmarkAccuracyCalculator", "recall_at_k"]

RECALL_KS = (1, 2, 4, 8)


def recall_at_k(
    knn_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
    label_comparison_fn=torch.eq,
) -> float | list[float]:
    """Fraction of queries with a same-label item among their ``k`` nearest neighbours.

    Args:
        knn_labels: ``(Q, k')`` labels of each query's neighbours, nearest first,
            ``k' >= k`` (fewer only when the reference set is that small).
        query_labels: ``(Q,)`` labels.
        k: how many neighbours count.
    """
    hits = label_comparison_fn(query_labels[:, None], knn_labels[:, :k]).any(dim=1)
    return maybe_get_avg_of_avgs(
        hits.to(torch.float64), query_labels, avg_of_avgs, return_per_class
    )


class BenchmarkAccuracyCalculator(AnalysisAccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus ``recall_at_{1,2,4,8}``, ``spectral_decay`` and
    ``embedding_density`` (Roth et al., ICML 2020; see ``pml_crt.utils.analysis_metrics``).

    Build it like ``AccuracyCalculator`` (``include``, ``k``, ``knn_func``...),
    e.g. through ``pml_crt.utils.make_accuracy_calculator(calculator_class=...)``.
    """

    def requires_knn(self) -> list[str]:
        return super().requires_knn() + [f"recall_at_{k}" for k in RECALL_KS]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        needed = [
            int(name.rsplit("_", 1)[1])
            for name in self.get_curr_metrics()
            if name.startswith("recall_at_")
        ]
        if needed:
            available = num_reference_embeddings - int(ref_includes_query)
            k = max(k, min(max(needed), available))
        return k

    def _recall(self, k, knn_labels, query_labels, not_lone_query_mask, label_counts):
        knn_labels, query_labels = try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        return recall_at_k(
            knn_labels,
            query_labels,
            k,
            self.avg_of_avgs,
            self.return_per_class,
            self.label_comparison_fn,
        )

    def calculate_recall_at_1(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._recall(1, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_2(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._recall(2, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_4(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._recall(4, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_8(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._recall(8, knn_labels, query_labels, not_lone_query_mask, label_counts)
