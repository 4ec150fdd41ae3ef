"""The accuracy helper works with faiss and falls back to CustomKNN without it.

The metrics are compared exactly (up to float64 averaging) with a brute-force
reference that ranks by float64 similarity. That is valid on any machine only
because no two neighbours that would change a metric by trading places are
within float32 rounding of each other: ``_ranking_margin`` checks it on the data.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_crt.utils import faiss_available, make_accuracy_calculator


def _clustered_embeddings(seed=0, classes=12, per_class=9, dim=16):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=generator)
    return F.normalize(x, dim=1), labels


def _ranking_margin(x, labels):
    """The smallest float64 similarity gap that decides a metric.

    P@1, R-Precision and MAP@R of a query depend only on which of its first
    r + 1 neighbours (r relevant ones) are relevant, in order: only trading two
    adjacent neighbours of different relevance there changes them.
    """
    sims = x.double() @ x.double().t()
    margin = float("inf")
    for i in range(len(labels)):
        order = [j for j in torch.argsort(sims[i], descending=True).tolist() if j != i]
        relevant = [bool(labels[j] == labels[i]) for j in order]
        for pos in range(sum(relevant)):  # neighbours pos and pos + 1, up to the (r + 1)-th
            if relevant[pos] != relevant[pos + 1]:
                margin = min(margin, float(sims[i, order[pos]] - sims[i, order[pos + 1]]))
    return margin


def _float32_reach(dim):
    """How far a float32 k-NN search can move a similarity of unit vectors.

    faiss ranks by |x|^2 + |y|^2 - 2 x.y, CustomKNN by x.y after normalising
    again: sums of up to d + 2 terms of size up to 4, each off by at most eps
    of the sum of |terms|. Two similarities trade places only within twice that.
    """
    return 2 * 4 * (dim + 2) * torch.finfo(torch.float32).eps


def _reference_metrics(x, labels):
    """P@1, R-Precision and MAP@R by brute force over (float64) cosine similarity."""
    assert _ranking_margin(x, labels) > _float32_reach(x.shape[1]), "near-tied neighbours"
    sims = x.double() @ x.double().t()
    n = len(labels)
    p1 = r_prec = map_r = 0.0
    for i in range(n):
        order = [j for j in sorted(range(n), key=lambda j: -float(sims[i, j])) if j != i]
        relevant = [bool(labels[j] == labels[i]) for j in order]
        r = sum(relevant)
        p1 += relevant[0]
        r_prec += sum(relevant[:r]) / r
        hits, ap = 0, 0.0
        for rank, rel in enumerate(relevant[:r], start=1):
            if rel:
                hits += 1
                ap += hits / rank
        map_r += ap / r
    return {
        "precision_at_1": p1 / n,
        "r_precision": r_prec / n,
        "mean_average_precision_at_r": map_r / n,
    }


@pytest.mark.parametrize("prefer_faiss", [True, False])
def test_metrics_match_brute_force(prefer_faiss):
    if prefer_faiss and not faiss_available():
        pytest.skip("faiss is not installed")
    x, labels = _clustered_embeddings()
    calculator = make_accuracy_calculator(prefer_faiss=prefer_faiss, batch_size=32)
    got = calculator.get_accuracy(x, labels)
    expected = _reference_metrics(x, labels)
    # Same rankings: PML averages in float64 (~1e-14 off); one trade of neighbours
    # would move a metric by >= 1 / (n r^2 (r - 1)) ~ 2e-6 (MAP@R, n = 108, r = 8).
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_falls_back_to_custom_knn_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert not faiss_available()
    calculator = make_accuracy_calculator()
    assert isinstance(calculator.knn_func, CustomKNN)
    x, labels = _clustered_embeddings(seed=1)
    got = calculator.get_accuracy(x, labels)
    assert got["precision_at_1"] == pytest.approx(_reference_metrics(x, labels)["precision_at_1"])


def test_clustering_metrics_keep_pml_equality():
    if not faiss_available():
        pytest.skip("NMI/AMI need faiss's k-means")
    x, labels = _clustered_embeddings(seed=2)
    calculator = make_accuracy_calculator(include=("precision_at_1", "NMI"))
    got = calculator.get_accuracy(x, labels)
    assert got["precision_at_1"] == pytest.approx(_reference_metrics(x, labels)["precision_at_1"])
    assert 0.0 < got["NMI"] <= 1.0
