"""The SOP-scale evaluation script, on a tiny size."""

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
    assert default.get_accuracy(x, y) == pytest.approx(stock.get_accuracy(x, y), abs=1e-7)


def test_eval_scale_runs_and_knn_paths_agree():
    methods = ("faiss", "custom:512") if faiss_available() else ("custom:2048", "custom:512")
    result = run(2_000, 32, methods, threads=1, noise=2.0, isolate=False)
    assert result["num_images"] == 2_000
    assert [m["method"] for m in result["methods"]] == list(methods)
    assert result["comparison"]["agree"], result["comparison"]
    for m in result["methods"]:
        assert set(m["metrics"]) == set(METRICS)
        assert 0 < m["metrics"]["mean_average_precision_at_r"] < 1
        assert m["peak_rss_mib"] >= m["baseline_rss_mib"] > 0
    assert result["fastest"] in methods


def test_a_method_runs_in_a_fresh_process():
    result = run(1_000, 16, ("custom:256",), threads=1, noise=2.0)
    (entry,) = result["methods"]
    assert entry["method"] == "custom:256" and entry["peak_rss_mib"] >= entry["baseline_rss_mib"]
    assert 0 < entry["metrics"]["precision_at_1"] <= 1
