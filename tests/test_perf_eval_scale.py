"""The SOP-scale evaluation script, on a tiny size.

k-NN paths (faiss, CustomKNN at any batch size) rank by float32 similarities
computed in different orders, so two of them can only disagree on queries whose
deciding neighbours are within float32 rounding of each other (near ties,
counted in float64 by ``_near_tied_queries``); each such query moves a metric,
a mean over the queries, by at most 1 / N.
"""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from benchmarks.perf.eval_scale import (
    METRICS,
    SOP_CLASSES,
    SOP_IMAGES,
    make_knn,
    run,
    sop_like_labels,
    synthetic_embeddings,
)
from pml_crt.utils import faiss_available, make_accuracy_calculator
from pml_crt.utils.accuracy import labels_equal


@pytest.fixture(autouse=True)
def _restore_threads():
    """``run`` in this process sets torch's and faiss's thread counts: restore them."""
    try:
        import faiss
    except ImportError:
        faiss = None
    threads = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    yield
    torch.set_num_threads(threads[0])
    if faiss:
        faiss.omp_set_num_threads(threads[1])


def _near_tied_queries(embeddings, labels) -> int:
    """Queries that a float32 k-NN search could rank differently from the exact order.

    P@1, R-Precision and MAP@R of a query depend only on which of its first
    r + 1 neighbours (r relevant ones) are relevant, in order: only trading two
    adjacent neighbours of different relevance there changes them. A float32
    similarity of unit vectors is within 4 (d + 2) eps of exact (faiss ranks by
    |x|^2 + |y|^2 - 2 x.y, CustomKNN by x.y: d + 2 terms of size up to 4), so
    two can trade places only when their float64 gap is under twice that.
    """
    x = torch.as_tensor(embeddings, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    reach = 2 * 4 * (x.shape[1] + 2) * torch.finfo(torch.float32).eps
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True)[:, :-1]  # every other image, best first
    ranked = sims.gather(1, order)
    relevant = labels[order] == labels[:, None]
    positions = torch.arange(order.shape[1] - 1)
    deciding = (relevant[:, :-1] != relevant[:, 1:]) & (positions < relevant.sum(1, keepdim=True))
    return int((deciding & (ranked[:, :-1] - ranked[:, 1:] <= reach)).any(dim=1).sum())


def _sop_like_data(num_images, dim, noise, seed=0):
    """The labels and embeddings ``run`` builds for these arguments."""
    num_classes = max(1, round(num_images * SOP_CLASSES / SOP_IMAGES))
    labels = sop_like_labels(num_classes, num_images, seed=seed)
    return synthetic_embeddings(labels, dim, noise, seed=seed), labels


def test_sop_like_labels_have_sop_class_sizes():
    labels = sop_like_labels(SOP_CLASSES, SOP_IMAGES)
    sizes = np.bincount(labels)
    assert len(labels) == SOP_IMAGES and len(sizes) == SOP_CLASSES
    assert sizes.min() >= 2 and sizes.max() <= 12
    assert sizes.mean() == pytest.approx(SOP_IMAGES / SOP_CLASSES)


def test_synthetic_embeddings_are_unit_norm_float32():
    labels = sop_like_labels(20, 100)
    x = synthetic_embeddings(labels, 16, noise=1.0)
    assert x.dtype == np.float32 and x.shape == (100, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_per_class_label_counting_gives_pml_stock_metrics():
    labels = sop_like_labels(60, 300)
    x = torch.from_numpy(synthetic_embeddings(labels, 16, noise=2.0))
    y = torch.from_numpy(labels)
    knn = make_knn("custom:64")
    stock = AccuracyCalculator(include=METRICS, k="max_bin_count", knn_func=knn)
    ours = AccuracyCalculator(
        include=METRICS, k="max_bin_count", knn_func=knn, label_comparison_fn=labels_equal
    )
    assert stock.get_accuracy(x, y) == ours.get_accuracy(x, y)
    default = make_accuracy_calculator(prefer_faiss=False)
    assert default.label_comparison_fn is labels_equal
    # Another query block size, the same ranking where nothing is near-tied.
    assert _near_tied_queries(x, y) == 0
    assert default.get_accuracy(x, y) == pytest.approx(stock.get_accuracy(x, y), abs=1e-7)


def test_eval_scale_runs_and_knn_paths_agree():
    methods = ("faiss", "custom:512") if faiss_available() else ("custom:2048", "custom:512")
    result = run(2_000, 32, methods, threads=1, noise=2.0, isolate=False)
    assert result["num_images"] == 2_000
    assert [m["method"] for m in result["methods"]] == list(methods)
    near_ties = _near_tied_queries(*_sop_like_data(2_000, 32, 2.0))
    assert near_ties <= 2  # so that the script's own 1e-3 agreement threshold holds
    assert result["comparison"]["agree"], result["comparison"]
    for metric, difference in result["comparison"]["max_abs_diff"].items():
        assert difference <= near_ties / 2_000, (metric, difference, near_ties)
    for m in result["methods"]:
        assert set(m["metrics"]) == set(METRICS)
        assert 0 < m["metrics"]["mean_average_precision_at_r"] < 1
    clock = result["clock"]
    assert result["fastest"] == min(result["methods"], key=lambda m: m[clock])["method"]


def test_a_method_runs_in_a_fresh_process():
    """The worker process (one thread, pinned by ``run``) computes what this process does."""
    result = run(1_000, 16, ("custom:256",), threads=1, noise=2.0)
    (entry,) = result["methods"]
    assert entry["method"] == "custom:256" and entry["threads"] == 1
    (here,) = run(1_000, 16, ("custom:256",), threads=1, noise=2.0, isolate=False)["methods"]
    # Both rank with the same float32 code and one thread; even if they rounded
    # differently, only near-tied queries could move a metric, by 1 / N each.
    near_ties = _near_tied_queries(*_sop_like_data(1_000, 16, 2.0))
    for metric, value in here["metrics"].items():
        assert abs(entry["metrics"][metric] - value) <= near_ties / 1_000, metric
