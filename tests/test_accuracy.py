"""The accuracy helper works with faiss and falls back to CustomKNN without it."""

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


def _reference_metrics(x, labels):
    """P@1, R-Precision and MAP@R by brute force over cosine similarity."""
    sims = x @ x.t()
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
